"""memento.modeling: adding the special tokens, their embedding initialisation, tiny models, attention checks.

The embedding tests use a WordLevel tokenizer with no pre-tokenizer, so each whole input string is
one vocabulary lookup: ``"block"`` is one token, ``" block"`` is ``<unk>`` (and so rejected), and
``" done"`` is in the vocabulary only with its leading space. Expected rows are recomputed by hand
with the documented noise order: one ``torch.Generator`` seeded with ``seed``; per initialised
token (memento tokens, then think tokens) one draw for the input row, then one for the output row
when untied.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from memento.format import (
    BLOCK_END,
    BLOCK_START,
    MEMENTO_TOKENS,
    SUMMARY_END,
    SUMMARY_START,
    THINK_END,
    THINK_START,
    THINK_TOKENS,
    SpecialTokenIds,
)
from memento.modeling import (
    ADDED,
    ALREADY_PRESENT,
    RELATED_WORDS,
    ROW_ADDED,
    add_memento_tokens,
    build_tiny_model,
    check_attention_implementation,
    count_parameters,
    format_parameter_count,
    layer_masks,
    layer_windows,
    load_model_and_tokenizer,
    word_token_id,
)
from memento.tiny_tokenizer import build_tiny_tokenizer

ATOL = 1e-6
NEW_TOKENS = (*MEMENTO_TOKENS, *THINK_TOKENS)
SOME_WORDS = ("block", "start", "end", "summary", " done")
"""In the vocabulary: block, start, end, summary, and done (only as ' done')."""
EXPECTED_WORDS = {
    BLOCK_START: ("block", "start"),
    BLOCK_END: ("block", "end", "done"),
    SUMMARY_START: ("summary",),
    SUMMARY_END: ("summary", "end", "done"),
    THINK_START: (),
    THINK_END: (),
}


def word_tokenizer(words=SOME_WORDS) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "</s>", "<extra>", *words, "x", "y", "z"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        additional_special_tokens=["<extra>"],
    )


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Character level, without any memento token: every related word needs several tokens."""
    chars = "abcdefghijklmnopqrstuvwxyz "
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "</s>", *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def tiny_config(kind: str, vocab_size: int, *, hidden: int = 32, tie: bool) -> LlamaConfig | Qwen3Config:
    cls = {"llama": LlamaConfig, "qwen3": Qwen3Config}[kind]
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )


def tiny_model(kind: str, vocab_size: int, *, hidden: int = 32, tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    cls = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM}[kind]
    return cls(tiny_config(kind, vocab_size, hidden=hidden, tie=tie)).eval()


def expected_rows(
    inp: torch.Tensor,
    out: torch.Tensor | None,
    word_ids: dict[str, list[int]],
    fallback_ids: list[int],
    order: tuple[str, ...],
    *,
    seed: int = 0,
    noise_std: float = 0.01,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Each token's input row (and output row if untied) recomputed from the pre-add weights."""
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for tok in order:
        rows = []
        for weight in (inp, out):
            if weight is None:
                rows.append(None)
                continue
            ids = word_ids[tok] or fallback_ids
            noise = torch.randn(weight.shape[1], generator=gen, dtype=torch.float32) * noise_std
            rows.append(weight[ids].float().mean(0) + noise)
        result[tok] = (rows[0], rows[1])
    return result


def ids_of(tokenizer, words) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[w] if w in vocab else vocab[" " + w] for w in words]


# ----------------------------------------------------------------------------------------------
# Word lookup
# ----------------------------------------------------------------------------------------------


def test_related_words_are_the_papers() -> None:
    assert RELATED_WORDS == {
        BLOCK_START: ("block", "start", "begin", "section", "step"),
        BLOCK_END: ("block", "end", "finish", "section", "done"),
        SUMMARY_START: ("summary", "summarize", "brief", "recap", "overview"),
        SUMMARY_END: ("summary", "end", "finish", "done", "complete"),
    }


def test_word_token_id_spellings_unk_and_multi_token() -> None:
    tok = word_tokenizer()
    vocab = tok.get_vocab()
    assert word_token_id(tok, "block") == vocab["block"]  # " block" is <unk>, "block" is one token
    assert word_token_id(tok, "done") == vocab[" done"]  # only the spaced spelling exists
    assert word_token_id(tok, "begin") is None  # <unk> is never a word
    chars = char_tokenizer()
    assert word_token_id(chars, "block") is None  # five tokens
    assert word_token_id(chars, "x") == chars.get_vocab()["x"]


# ----------------------------------------------------------------------------------------------
# add_memento_tokens: numerics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("tie", [False, True])
def test_new_rows_are_mean_of_related_words_plus_noise(kind: str, tie: bool) -> None:
    tok = word_tokenizer()
    old_len = len(tok)
    model = tiny_model(kind, old_len, tie=tie)
    inp_before = model.get_input_embeddings().weight.detach().clone()
    out_before = None if tie else model.get_output_embeddings().weight.detach().clone()

    report = add_memento_tokens(tok, model, seed=123)

    assert report.num_added == 6 and report.added_to_tokenizer == NEW_TOKENS
    assert len(tok) == old_len + 6
    assert report.rows_before == old_len and report.rows_after == old_len + 6 and report.resized
    assert report.tied is tie
    inp = model.get_input_embeddings().weight.detach()
    out = model.get_output_embeddings().weight.detach()
    assert inp.shape[0] == len(tok) and out.shape[0] == len(tok) and model.config.vocab_size == len(tok)
    if tie:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    else:
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight

    word_ids = {t: ids_of(tok, w) for t, w in EXPECTED_WORDS.items()}
    expected = expected_rows(inp_before, out_before, word_ids, list(range(old_len)), NEW_TOKENS, seed=123)
    vocab = tok.get_vocab()
    for token in NEW_TOKENS:
        entry = report[token]
        assert entry.status == ADDED and entry.token_id == vocab[token] >= old_len
        assert entry.words == EXPECTED_WORDS[token]
        assert list(entry.word_ids) == word_ids[token]
        assert entry.fallback == (not EXPECTED_WORDS[token])
        assert entry.input_initialised and entry.output_initialised is (not tie)
        exp_in, exp_out = expected[token]
        torch.testing.assert_close(inp[entry.token_id], exp_in, atol=ATOL, rtol=0)
        if tie:
            assert exp_out is None
        else:
            torch.testing.assert_close(out[entry.token_id], exp_out, atol=ATOL, rtol=0)
            assert not torch.allclose(out[entry.token_id], exp_in, atol=1e-4)  # its own noise, own mean
    assert set(report[BLOCK_START].skipped_words) == {"begin", "section", "step"}
    assert set(report[SUMMARY_END].skipped_words) == {"finish", "complete"}
    # existing rows are untouched
    torch.testing.assert_close(inp[:old_len], inp_before, atol=0, rtol=0)
    if not tie:
        torch.testing.assert_close(out[:old_len], out_before, atol=0, rtol=0)
    assert "fallback" in report.summary()


def test_noise_differs_between_tokens_with_the_same_words_and_between_seeds() -> None:
    rows = {}
    for seed in (0, 1):
        tok = word_tokenizer()
        model = tiny_model("llama", len(tok), tie=True)
        add_memento_tokens(tok, model, seed=seed)
        rows[seed] = model.get_input_embeddings().weight.detach().clone()
    think_start, think_end = len(word_tokenizer()) + 4, len(word_tokenizer()) + 5
    # both think tokens use the same fallback mean but different noise draws
    assert not torch.allclose(rows[0][think_start], rows[0][think_end])
    assert not torch.allclose(rows[0][-6:], rows[1][-6:])
    # deterministic
    tok = word_tokenizer()
    model = tiny_model("llama", len(tok), tie=True)
    add_memento_tokens(tok, model, seed=0)
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), rows[0], atol=0, rtol=0)


def test_fallback_when_no_related_word_is_in_the_vocabulary() -> None:
    tok = word_tokenizer(words=("block", "start"))
    old_len = len(tok)
    model = tiny_model("llama", old_len, tie=False)
    inp_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()
    report = add_memento_tokens(tok, model)
    words = {BLOCK_START: ("block", "start"), BLOCK_END: ("block",)}
    for token in NEW_TOKENS:
        assert report[token].words == words.get(token, ())
        assert report[token].fallback == (token not in words)
    assert report.fallback_rows == old_len
    word_ids = {t: ids_of(tok, words.get(t, ())) for t in NEW_TOKENS}
    expected = expected_rows(inp_before, out_before, word_ids, list(range(old_len)), NEW_TOKENS)
    inp = model.get_input_embeddings().weight.detach()
    out = model.get_output_embeddings().weight.detach()
    for token in NEW_TOKENS:
        tid = report[token].token_id
        torch.testing.assert_close(inp[tid], expected[token][0], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[tid], expected[token][1], atol=ATOL, rtol=0)
    # the fallback is the mean of all pre-existing rows, so a fallback row sits within noise of it
    assert (inp[report[SUMMARY_START].token_id] - inp_before.mean(0)).abs().max() < 0.06


def test_words_needing_several_tokens_are_skipped() -> None:
    tok = char_tokenizer()
    model = tiny_model("qwen3", len(tok), tie=True)
    report = add_memento_tokens(tok, model)
    for token in MEMENTO_TOKENS:
        assert report[token].words == () and report[token].fallback
        assert report[token].skipped_words == RELATED_WORDS[token]
    assert "no related word is a single token" in report.summary()


def test_noise_std_is_as_asked() -> None:
    hidden = 1024
    for std in (0.01, 0.05):
        tok = word_tokenizer()
        old_len = len(tok)
        model = tiny_model("llama", old_len, hidden=hidden, tie=False)
        inp_before = model.get_input_embeddings().weight.detach().clone()
        out_before = model.get_output_embeddings().weight.detach().clone()
        report = add_memento_tokens(tok, model, noise_std=std, seed=7)
        residuals = []
        for token in NEW_TOKENS:
            entry = report[token]
            ids = list(entry.word_ids) or list(range(old_len))
            pairs = ((inp_before, model.get_input_embeddings()), (out_before, model.get_output_embeddings()))
            for before, after in pairs:
                residuals.append(after.weight.detach()[entry.token_id] - before[ids].mean(0))
        noise = torch.cat(residuals)
        assert noise.numel() == 2 * 6 * hidden
        assert abs(noise.std().item() - std) < 0.05 * std  # ~1% sampling error expected
        assert abs(noise.mean().item()) < 0.05 * std


def test_idempotent_and_existing_special_tokens_kept() -> None:
    tok = word_tokenizer()
    model = tiny_model("qwen3", len(tok), tie=False)
    add_memento_tokens(tok, model)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    length = len(tok)
    assert tok.extra_special_tokens == ["<extra>", *NEW_TOKENS]

    again = add_memento_tokens(tok, model)
    assert again.num_added == 0 and not again.resized and len(tok) == length
    assert all(entry.status == ALREADY_PRESENT and not entry.input_initialised for entry in again)
    assert "already present" in again.summary()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=0, rtol=0)
    assert tok.extra_special_tokens == ["<extra>", *NEW_TOKENS]
    # all are special: skipped when decoding, never split when encoding
    text = f"x{BLOCK_START}y{BLOCK_END}{SUMMARY_START}z{SUMMARY_END}<extra>"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 8
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "xyz"


def test_tiny_tokenizer_tokens_are_already_present() -> None:
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_hidden_layers=1, intermediate_size=32)
    before = model.get_input_embeddings().weight.detach().clone()
    report = add_memento_tokens(tok, model)
    assert report.num_added == 0 and [e.status for e in report] == [ALREADY_PRESENT] * 6
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), before, atol=0, rtol=0)


def test_tokenizer_only_then_model_rows() -> None:
    tok = word_tokenizer()
    old_len = len(tok)
    model = tiny_model("llama", old_len, tie=False)  # sized to the tokenizer before the tokens
    inp_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()

    first = add_memento_tokens(tok)
    assert first.num_added == 6 and first.rows_before is None and first.tied is None
    assert all(e.status == ADDED and not e.input_initialised for e in first)
    assert "no model given" in first.summary()

    second = add_memento_tokens(tok, model, seed=5)
    assert second.num_added == 0 and second.rows_before == old_len and second.rows_after == old_len + 6
    assert all(e.status == ROW_ADDED and e.input_initialised and e.output_initialised for e in second)
    word_ids = {t: ids_of(tok, w) for t, w in EXPECTED_WORDS.items()}
    expected = expected_rows(inp_before, out_before, word_ids, list(range(old_len)), NEW_TOKENS, seed=5)
    for token in NEW_TOKENS:
        tid = second[token].token_id
        inp, out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
        torch.testing.assert_close(inp[tid], expected[token][0], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[tid], expected[token][1], atol=ATOL, rtol=0)


def test_model_with_spare_rows_keeps_its_size() -> None:
    """Like Qwen's padded vocabularies: new ids land on spare rows; the fallback ignores spare rows."""
    tok = word_tokenizer(words=("block",))
    old_len = len(tok)
    model = tiny_model("qwen3", old_len + 10, tie=True)
    inp_before = model.get_input_embeddings().weight.detach().clone()
    report = add_memento_tokens(tok, model)
    assert report.rows_before == report.rows_after == old_len + 10 and not report.resized
    assert any("keeps its" in note for note in report.notes)
    word_ids = {t: ids_of(tok, ("block",) if t in (BLOCK_START, BLOCK_END) else ()) for t in NEW_TOKENS}
    expected = expected_rows(inp_before, None, word_ids, list(range(old_len)), NEW_TOKENS)
    inp = model.get_input_embeddings().weight.detach()
    for token in NEW_TOKENS:
        torch.testing.assert_close(inp[report[token].token_id], expected[token][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(inp[old_len + 6 :], inp_before[old_len + 6 :], atol=0, rtol=0)


def test_without_think_tokens() -> None:
    tok = word_tokenizer()
    model = tiny_model("llama", len(tok), tie=True)
    report = add_memento_tokens(tok, model, add_think_tokens=False)
    assert report.added_to_tokenizer == MEMENTO_TOKENS
    assert THINK_START not in tok.get_vocab()
    with pytest.raises(KeyError):
        report[THINK_START]


def test_global_rng_untouched() -> None:
    torch.manual_seed(3)
    reference = torch.rand(4)
    tok = word_tokenizer()
    model = tiny_model("llama", len(tok), tie=False)
    torch.manual_seed(3)
    add_memento_tokens(tok, model)
    torch.testing.assert_close(torch.rand(4), reference)


def test_save_and_load_round_trip(tmp_path) -> None:
    tok = word_tokenizer()
    model = tiny_model("qwen3", len(tok), tie=True)
    add_memento_tokens(tok, model)
    ids = SpecialTokenIds.from_tokenizer(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    loaded, loaded_tok = load_model_and_tokenizer(tmp_path)
    assert SpecialTokenIds.from_tokenizer(loaded_tok) == ids
    assert ids.think_start is not None and ids.think_end is not None
    assert len(loaded_tok) == len(tok) and loaded_tok.get_vocab() == tok.get_vocab()
    assert loaded_tok.extra_special_tokens == tok.extra_special_tokens
    text = f"{BLOCK_START}block{BLOCK_END}{SUMMARY_START}summary{SUMMARY_END}"
    assert loaded_tok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert check_attention_implementation(loaded) == "sdpa"
    state = model.state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)
    # loading again adds nothing
    assert add_memento_tokens(loaded_tok, loaded).num_added == 0


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model_and_tokenizer(tmp_path / "missing")
    tok = word_tokenizer()
    model = tiny_model("llama", len(tok), tie=True)
    add_memento_tokens(tok)  # tokenizer extended without the model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="embedding rows"):
        load_model_and_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------
# build_tiny_model
# ----------------------------------------------------------------------------------------------

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 64}


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
def test_build_tiny_model_forward(arch: str) -> None:
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, arch=arch, **SMALL)
    expected_cls = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert type(model).__name__ == expected_cls
    cfg = model.config
    assert cfg.vocab_size == len(tok) and cfg.head_dim == 64 // 4
    assert cfg.pad_token_id == tok.pad_token_id and cfg.eos_token_id == tok.eos_token_id
    assert cfg.bos_token_id == tok.bos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert check_attention_implementation(model) == "sdpa"
    batch = tok(["<think>ab</think>c", "<|block_start|>x"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    n = count_parameters(model)
    assert n == sum(p.numel() for p in set(model.parameters())) and format_parameter_count(n).endswith("K")


def test_build_tiny_model_seeded() -> None:
    tok = build_tiny_tokenizer()
    torch.manual_seed(11)
    reference = torch.rand(3)
    torch.manual_seed(11)
    a = build_tiny_model(tok, seed=1, **SMALL)
    torch.testing.assert_close(torch.rand(3), reference)  # the caller's RNG is left alone
    b = build_tiny_model(tok, seed=1, **SMALL)
    c = build_tiny_model(tok, seed=2, **SMALL)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_build_tiny_model_options() -> None:
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, tie_word_embeddings=False, dtype=torch.bfloat16, attn_implementation="eager", **SMALL)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert check_attention_implementation(model) == "eager"
    with pytest.raises(ValueError, match="unknown arch 'gpt2'"):
        build_tiny_model(tok, arch="gpt2")
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        build_tiny_model(tok, hidden_size=30, num_attention_heads=4)


# ----------------------------------------------------------------------------------------------
# check_attention_implementation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("impl", "phrase"),
    [
        ("flash_attention_2", "flash attention"),
        ("flash_attention_3", "flash attention"),
        ("flex_attention", "make_block_mask"),
        ("paged|eager", "paged attention"),
        ("my_kernel", "not one we support"),
        (None, "not set"),
    ],
)
def test_check_attention_rejects(impl: str | None, phrase: str) -> None:
    model = tiny_model("qwen3", 16, tie=True)
    model.config._attn_implementation = impl  # constructing with flash_attention_2 needs the package
    with pytest.raises(ValueError, match=phrase) as info:
        check_attention_implementation(model)
    message = str(info.value)
    assert "set_attn_implementation('sdpa')" in message and "Supported: sdpa, eager" in message
    if impl is not None:
        assert repr(impl) in message


def test_check_attention_accepts_and_follows_set_attn_implementation() -> None:
    model = tiny_model("llama", 16, tie=True)
    assert check_attention_implementation(model) == "sdpa"
    model.set_attn_implementation("eager")
    assert check_attention_implementation(model) == "eager"


def test_layer_windows_reads_each_layer_type_and_refuses_unknown_ones() -> None:
    model = tiny_model("qwen3", 16, tie=True)
    assert layer_windows(model) == {"full_attention": None}
    model.config.layer_types = ["sliding_attention", "full_attention"]
    model.config.sliding_window = 5
    assert layer_windows(model) == {"sliding_attention": 5, "full_attention": None}
    model.config.layer_types = ["chunked_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        layer_windows(model)


def test_layer_masks_give_one_mask_per_window() -> None:
    """A dict keyed by layer type only when windows differ; eager gets the additive form of each."""
    mask = torch.tril(torch.ones(1, 1, 12, 12, dtype=torch.bool))
    same = layer_masks(mask, {"full_attention": None}, "sdpa")
    assert isinstance(same, torch.Tensor) and torch.equal(same, mask)
    both = layer_masks(mask, {"sliding_attention": 3, "full_attention": None}, "eager")
    assert set(both) == {"sliding_attention", "full_attention"}
    assert (both["full_attention"] == 0).sum() == mask.sum()
    assert (both["sliding_attention"] == 0).sum() == 1 + 2 + 3 * 10  # rows see min(row + 1, 3) keys
