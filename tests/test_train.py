"""The SFT collator and trainer: loss under the memento mask, padding, labels, refusal, resume."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from helpers import completion_token_losses, hand_mask, records, tiny_model
from memento.chat import assistant_prefix_ids
from memento.format import MementoFormatError, SpecialTokenIds
from memento.masking import MaskConfig
from memento.modeling import build_tiny_model, check_attention_implementation
from memento.tiny_tokenizer import build_tiny_tokenizer
from memento.train.collate import IGNORE_INDEX, MementoCollator, tokenize_example
from memento.train.sft import (
    SFTSettings,
    make_collator,
    prepare_examples,
    read_log,
    tied_keys_restored,
    train_stage,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_labels_cover_the_completion_and_eos_only(tokenizer) -> None:
    example = tokenize_example(tokenizer, "Add 1 2", "<think>\nx</think>\n3")
    collator = MementoCollator(SpecialTokenIds.from_tokenizer(tokenizer), tokenizer.pad_token_id)
    batch = collator([example])
    labels = batch["labels"][0]
    n_prompt = example["completion_mask"].index(1)
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    completion = tokenizer.decode(labels[n_prompt:].tolist())
    assert completion == "<think>\nx</think>\n3<|im_end|>"
    assert tokenizer.decode(example["input_ids"][:n_prompt]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_memento_loss_equals_hand_built_mask_and_plain_forward(tokenizer, impl: str) -> None:
    model = tiny_model(tokenizer, impl)
    specials = SpecialTokenIds.from_tokenizer(tokenizer)
    settings = SFTSettings(mask=MaskConfig.chat(keep_last_n=0))
    collator = make_collator(model, tokenizer, stage=2, settings=settings)
    examples = [tokenize_example(tokenizer, r["problem"], r["response"]) for r in records(3)]
    batch = collator(examples)
    with torch.no_grad():
        loss = model(**batch).loss

    prefix = assistant_prefix_ids(tokenizer)
    token_losses = []
    for example in examples:
        ids = example["input_ids"]
        tracked_from = next(i + len(prefix) for i in range(len(ids)) if ids[i : i + len(prefix)] == prefix)
        mask = hand_mask(ids, specials, tracked_from)
        assert (~mask).sum() > 0, "the trace must have evicted cells"
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([ids]),
                attention_mask=(mask if impl == "sdpa" else additive)[None, None],
                position_ids=torch.arange(len(ids))[None],
            ).logits[0]
        labels = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(ids, example["completion_mask"], strict=True)])
        token_losses.append(completion_token_losses(logits, labels))
    expected = torch.cat(token_losses).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    # and the memento mask really differs from full attention on this batch
    with torch.no_grad():
        causal_loss = model(**make_collator(model, tokenizer, stage=1, settings=settings)(examples)).loss
    assert abs(causal_loss.item() - loss.item()) > 1e-4


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_changes_nothing(tokenizer, padding_side: str) -> None:
    model = tiny_model(tokenizer)
    base = make_collator(model, tokenizer, stage=2, settings=SFTSettings())
    examples = [tokenize_example(tokenizer, r["problem"], r["response"]) for r in records(4, seed=3)]
    examples[1] = tokenize_example(tokenizer, "Add 5", records(1, seed=9, blocks=1)[0]["response"])  # short
    padded = MementoCollator(**{**base.__dict__, "padding_side": padding_side, "pad_to_multiple_of": 64})
    batch = padded(examples)
    assert batch["input_ids"].shape[1] % 64 == 0
    with torch.no_grad():
        batched = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for b, example in enumerate(examples):
            alone = base([example])
            logits = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
            n = len(example["input_ids"])
            offset = batch["input_ids"].shape[1] - n if padding_side == "left" else 0
            torch.testing.assert_close(batched[b, offset : offset + n], logits, rtol=1e-5, atol=1e-5)
            assert torch.equal(batch["labels"][b, offset : offset + n], alone["labels"][0])
            assert (batch["labels"][b, :offset] == IGNORE_INDEX).all()
            assert (batch["labels"][b, offset + n :] == IGNORE_INDEX).all()


def test_stage_1_right_padding_leaves_the_mask_out_and_changes_nothing(tokenizer) -> None:
    """Stage 1 right-pads without a padding mask (so SDPA runs its causal kernel): every real token's
    logits and the loss equal those of each example alone and of the left-padded, masked batch."""
    model = tiny_model(tokenizer)
    right = make_collator(model, tokenizer, stage=1, settings=SFTSettings())
    left = MementoCollator(**{**right.__dict__, "padding_side": "left"})
    examples = [tokenize_example(tokenizer, r["problem"], r["response"]) for r in records(4, seed=5)]
    examples[2] = tokenize_example(tokenizer, "Add 5", records(1, seed=9, blocks=1)[0]["response"])  # short
    batch, masked = right(examples), left(examples)
    assert set(batch) == {"input_ids", "labels"} and "attention_mask" in masked
    assert batch["input_ids"].shape[1] > min(len(e["input_ids"]) for e in examples)  # it is padded
    with torch.no_grad():
        out = model(**batch)
        torch.testing.assert_close(out.loss, model(**masked).loss, rtol=1e-5, atol=1e-6)
        for b, example in enumerate(examples):
            alone = model(torch.tensor([example["input_ids"]])).logits[0]
            torch.testing.assert_close(out.logits[b, : len(alone)], alone, rtol=1e-5, atol=1e-5)


def test_a_model_that_cannot_take_a_4d_mask_is_refused(tokenizer) -> None:
    model = tiny_model(tokenizer)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="cannot apply the memento mask"):
        check_attention_implementation(model)
    with pytest.raises(ValueError, match="cannot apply the memento mask"):
        make_collator(model, tokenizer, stage=2, settings=SFTSettings())


def test_malformed_training_data_fails_before_training_naming_the_record(tokenizer) -> None:
    model = tiny_model(tokenizer)
    collator = make_collator(model, tokenizer, stage=2, settings=SFTSettings())
    good = records(2)
    bad = {"problem": "Add 1", "response": "<think>\n<|block_start|>1<|summary_start|>s=1<|summary_end|>\n</think>\n1"}
    with pytest.raises(MementoFormatError, match="record 2") as err:
        prepare_examples([*good, bad], tokenizer, check_with=collator)
    assert "its <|block_end|> is missing" in err.value.reason
    with pytest.raises(KeyError, match="control_response"):
        prepare_examples(good, tokenizer, response_field="control_response")


def test_restart_has_no_training_mask(tokenizer) -> None:
    with pytest.raises(ValueError, match="inference ablation"):
        MementoCollator(SpecialTokenIds.from_tokenizer(tokenizer), 0, mask_config=MaskConfig(restart=True))


def test_stage_trains_saves_the_best_and_resumes(tokenizer, tmp_path) -> None:
    data = records(24, seed=1)
    model = tiny_model(tokenizer)
    settings = SFTSettings(learning_rate=3e-3, max_steps=6, batch_size=8, eval_steps=3, logging_steps=1)
    collator = make_collator(model, tokenizer, stage=2, settings=settings)
    train = prepare_examples(data[:16], tokenizer, check_with=collator)
    evaluation = prepare_examples(data[16:], tokenizer, check_with=collator)
    best = train_stage(model, tokenizer, train, evaluation, stage=2, stage_dir=tmp_path / "s2", settings=settings)
    summary = json.loads((best / "memento_training.json").read_text())
    assert summary["global_step"] == 6 and summary["resumed_from"] is None
    assert summary["mask_config"]["keep_last_n"] == 0
    assert (best / "config.json").exists() and (best / "tokenizer.json").exists()
    log = read_log(tmp_path / "s2")
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) >= 6 and losses[-1] < losses[0]
    assert [e["step"] for e in log if "eval_loss" in e][:2] == [3, 6]

    # interrupted after step 6: asking for 9 steps resumes from checkpoint-6 instead of restarting
    more = SFTSettings(**{**settings.__dict__, "max_steps": 9})
    best = train_stage(model, tokenizer, train, evaluation, stage=2, stage_dir=tmp_path / "s2", settings=more)
    summary = json.loads((best / "memento_training.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-6")
    assert summary["global_step"] == 9


def test_memento_train_cli_runs_both_stages_from_files(tmp_path) -> None:
    from typer.testing import CliRunner

    from memento.cli import app
    from memento.synth import generate, write_split

    write_split(tmp_path / "train.jsonl", generate("running_sum", "train", 24, seed=0))
    write_split(tmp_path / "val.jsonl", generate("running_sum", "validation", 8, seed=0))
    common = ["--train", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "val.jsonl")]
    small = ["--tiny-hidden", "32", "--tiny-layers", "1", "--max-steps", "2", "--eval-steps", "1", "--batch-size", "8"]
    result = CliRunner().invoke(app, ["train", *common, "-o", str(tmp_path / "run"), "--tiny", "qwen3", *small])
    assert result.exit_code == 0, result.output
    stage1 = json.loads((tmp_path / "run/stage1/best/memento_training.json").read_text())
    stage2 = json.loads((tmp_path / "run/stage2/best/memento_training.json").read_text())
    assert stage1["attention"] == "full causal" and stage2["attention"] == "memento mask"
    assert stage2["initialised_from"] == str(tmp_path / "run/stage1/best")
    assert stage1["global_step"] == stage2["global_step"] == 2

    # the control model: stage 1 only, on the same problems without mementos
    control = ["--response-field", "control_response", "--stage", "1"]
    result = CliRunner().invoke(
        app, ["train", *common, "-o", str(tmp_path / "ctl"), "--tiny", "qwen3", *small, *control]
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "ctl/stage2").exists()


def test_memento_train_cli_bad_input(tmp_path) -> None:
    from typer.testing import CliRunner

    from memento.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"problem": "p", "response": "<think>\n<|block_start|>x<|block_end|>\n</think>\n1"}) + "\n"
    )
    runner = CliRunner()
    result = runner.invoke(
        app, ["train", "--train", str(bad), "--eval", str(bad), "-o", str(tmp_path / "r"), "--tiny", "qwen3"]
    )
    assert result.exit_code == 1 and "record 0" in result.output and "has no memento" in result.output
    result = runner.invoke(app, ["train", "--train", "nope.jsonl", "--eval", str(bad), "-o", "r", "--tiny", "qwen3"])
    assert result.exit_code == 2 and "no such file" in result.output
    result = runner.invoke(
        app, ["train", "--train", str(bad), "--eval", str(bad), "-o", "r", "--tiny", "qwen3", "--stage", "3"]
    )
    assert result.exit_code == 2 and "stage must be one of" in result.output


def tied_model(tokenizer):
    """A tiny model with tied embeddings, as the demo builds them (tests' ``tiny_model`` is untied)."""
    return build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, intermediate_size=64)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_reloading_the_best_checkpoint_does_not_call_tied_weights_missing(tokenizer, tmp_path) -> None:
    """The Trainer reloads the best checkpoint at the end; the tied head is not a missing key (it
    used to warn "There were missing keys in the checkpoint model loaded: ['lm_head.weight']")."""
    data = records(16, seed=2)
    model = tied_model(tokenizer)
    assert model.config.tie_word_embeddings
    settings = SFTSettings(learning_rate=3e-3, max_steps=4, batch_size=8, eval_steps=2, logging_steps=2)
    train = prepare_examples(data[:8], tokenizer)
    evaluation = prepare_examples(data[8:], tokenizer)
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        train_stage(model, tokenizer, train, evaluation, stage=1, stage_dir=tmp_path / "s1", settings=settings)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in handler.messages if "missing keys" in m], handler.messages
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the reload


def test_only_keys_tied_to_a_loaded_weight_count_as_restored(tokenizer) -> None:
    model = tied_model(tokenizer)
    assert tied_keys_restored(model, ["lm_head.weight", "model.norm.weight"]) == ["lm_head.weight"]
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied: really missing
    assert tied_keys_restored(model, ["lm_head.weight"]) == []
