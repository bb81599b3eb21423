"""The `memento` command line (validate, inspect) and the mask pictures behind --mask-png."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
import typer.main
from typer.testing import CliRunner

from memento import cli
from memento.cli import app
from memento.cli import validate as validate_module
from memento.format import MementoTrace, record_from_trace, render_response
from memento.records_io import write_records
from memento.stats import trace_stats
from memento.tokens import RegexTokenizer

runner = CliRunner()
ENV = {"COLUMNS": "200"}  # a wide console, so rich never wraps the lines asserted on

# Regex-tokenizer counts by hand (see tests/test_stats.py): blocks 4 6 | 8 | 5 2 3, mementos 1 2 | 2 | 1 1 1
TRACES = [
    MementoTrace.new("p one", [(" a b c d ", " x "), (" e f g h i j ", " y z ")], "1"),
    MementoTrace.new("p two", [(" k l m n o p q r ", " s t ")], "2"),
    MementoTrace.new("p three", [(" 1 + 2 = 3 ", " three "), (" u v ", " w "), (" alpha beta gamma ", " delta ")], ""),
]
RECORDS = [record_from_trace(t, domain="math", source="test", difficulty=i) for i, t in enumerate(TRACES)]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], env=ENV)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def good_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "good.jsonl"
    write_records(path, RECORDS)
    return path


# ----------------------------------------------------------------------------------------------
# validate
# ----------------------------------------------------------------------------------------------


def test_validate_good_file_exact_stats(good_jsonl: Path) -> None:
    result = invoke("validate", good_jsonl)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "✓ all 3 records are well-formed" in out
    assert "3 default schema" in out
    assert "mean 2.00 · median 2 · min 1 · max 3" in out  # blocks per trace
    assert "mean 4.7 · median 4.5 · total 28" in out  # tokens per block
    assert "mean 1.3 · median 1.0 · total 8" in out  # tokens per memento
    assert "3.50×" in out  # 28 / 8
    assert "median 0.292" in out  # per-unit memento/block: median of .2 .25 .25 .333 .333 .5
    assert "2 of 3 records have one" in out  # answers
    assert "regex (approximate)" in out
    assert result.stderr == ""


def test_validate_reports_every_bad_record_and_exits_1(tmp_path: Path) -> None:
    no_block_end = dict(RECORDS[0], response=RECORDS[0]["response"].replace("<|block_end|>", "", 1))
    no_memento = dict(RECORDS[1], response=RECORDS[1]["response"].replace("<|summary_start|> s t <|summary_end|>", ""))
    lines = [json.dumps(r) for r in (RECORDS[0], no_block_end, RECORDS[1], no_memento, RECORDS[2])]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    result = invoke("validate", path)
    assert result.exit_code == 1
    out = result.stdout
    pos = no_block_end["response"].index("<|summary_start|>")
    assert f"line 2: position {pos}: <|summary_start|> inside block 1: its <|block_end|> is missing" in out
    pos4 = no_memento["response"].index("</think>")
    assert f"line 4: position {pos4}: block 1 has no memento: </think> came first" in out
    assert "line 1:" not in out and "line 3:" not in out and "line 5:" not in out
    assert "✗ 2 of 5 records are malformed" in out
    assert "Statistics of the 3 well-formed records" in out


def test_validate_non_json_line_reported_by_number(good_jsonl: Path, tmp_path: Path) -> None:
    lines = good_jsonl.read_text().splitlines()
    path = write_jsonl(tmp_path / "broken.jsonl", [lines[0], "", '{"problem": "x", ', lines[1], "42", lines[2]])
    result = invoke("validate", path)
    assert result.exit_code == 1
    assert "line 3: position 18: not valid JSON: Expecting property name" in result.stdout
    assert "line 5: not a JSON object but a JSON int" in result.stdout
    assert "✗ 2 of 5 records are malformed" in result.stdout


def test_validate_json_output(tmp_path: Path) -> None:
    bad = dict(RECORDS[2], response=RECORDS[2]["response"].replace("</think>", ""))
    path = write_jsonl(tmp_path / "j.jsonl", [json.dumps(RECORDS[0]), json.dumps(RECORDS[1]), json.dumps(bad), "nope"])
    result = invoke("validate", path, "--json")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert payload["ok"] is False
    assert (payload["records"], payload["valid"], payload["invalid"]) == (4, 2, 2)
    assert payload["format"] == "jsonl"
    expected = trace_stats(TRACES[:2], RegexTokenizer())
    stats = payload["stats"]
    assert stats.pop("schema") == {"default": 2, "full": 0}
    assert stats == json.loads(json.dumps(expected))
    assert stats["compression_ratio"] == pytest.approx((4 + 6 + 8) / (1 + 2 + 2))
    assert payload["errors"] == [
        {
            "label": 3,
            "where": "line 3",
            "position": len(bad["response"]),
            "reason": "the think section is never closed: no </think>",
        },
        {"label": 4, "where": "line 4", "position": 0, "reason": "not valid JSON: Expecting value"},
    ]
    assert payload["errors_truncated"] is False

    ok = invoke("validate", tmp_path / "j.jsonl", "--json", "--max-errors", "1")
    assert len(json.loads(ok.stdout)["errors"]) == 1 and json.loads(ok.stdout)["errors_truncated"] is True


def test_validate_max_errors_caps_the_listing_but_counts_all(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ["[]"] * 5)
    result = invoke("validate", path, "--max-errors", "2")
    assert result.exit_code == 1
    assert result.stdout.count("not a JSON object") == 2
    assert "… and 3 more" in result.stdout and "✗ 5 of 5 records are malformed" in result.stdout


def test_validate_progress_bar_goes_to_stderr_not_json_stdout(good_jsonl: Path, monkeypatch) -> None:
    monkeypatch.setattr(validate_module, "stderr_is_terminal", lambda: True)
    monkeypatch.setattr(validate_module, "PROGRESS_MIN_RECORDS", 1)
    result = invoke("validate", good_jsonl, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["records"] == 3


def test_validate_parquet_and_hf_dataset_dirs(tmp_path: Path) -> None:
    import datasets

    parquet = tmp_path / "data.parquet"
    write_records(parquet, RECORDS)
    result = invoke("validate", parquet, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["block_tokens"]["total"] == 28

    hf_dir = tmp_path / "hf"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(hf_dir))
    result = invoke("validate", hf_dir)
    assert result.exit_code == 0, result.output
    assert "✓ all 3 records are well-formed" in result.stdout

    dict_dir = tmp_path / "hf_dict"
    bad = dict(RECORDS[1], response=RECORDS[1]["response"].replace("<think>", ""))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([RECORDS[0], bad, RECORDS[2]])}).save_to_disk(
        str(dict_dir)
    )
    result = invoke("validate", dict_dir, "--split", "train")
    assert result.exit_code == 1
    assert "row 1: position 1: <|block_start|> before <think>" in result.stdout


def test_validate_full_schema(tmp_path: Path) -> None:
    full = [
        record_from_trace(TRACES[0], schema="full", block_sentences=[[" a b", " c d "], [" e f g h i j "]]),
        record_from_trace(TRACES[1], schema="full"),
    ]
    mismatched = record_from_trace(TRACES[2], schema="full")
    mismatched["block_summaries"][1] = " not the memento "
    path = tmp_path / "full.jsonl"
    write_records(path, [*full, mismatched, RECORDS[0]])
    result = invoke("validate", path)
    assert result.exit_code == 1
    assert "line 3: full schema: block_summaries[1] does not match block 2's memento in the response" in result.stdout

    write_records(path, [*full, RECORDS[2]])
    result = invoke("validate", path, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["stats"]["schema"] == {"default": 1, "full": 2}


def test_validate_wrongly_typed_fields_are_reported_not_crashes(tmp_path: Path) -> None:
    path = tmp_path / "types.jsonl"
    bad_blocks = dict(record_from_trace(TRACES[1], schema="full"), blocks=[["zero"]])
    write_records(path, [{"problem": "p", "response": 7}, {"response": "x"}, bad_blocks])
    result = invoke("validate", path)
    assert result.exit_code == 1
    assert "line 1: field 'response' must be a string, not int" in result.stdout
    assert "line 2: missing field 'problem'" in result.stdout
    assert "line 3: malformed record: ValueError" in result.stdout


def test_validate_usage_errors_exit_2(tmp_path: Path) -> None:
    result = invoke("validate", tmp_path / "missing.jsonl")
    assert result.exit_code == 2
    assert "no such file or directory" in result.stderr and result.stdout == ""
    (tmp_path / "x.csv").write_text("a,b\n")
    result = invoke("validate", tmp_path / "x.csv")
    assert result.exit_code == 2 and "unknown record format" in result.stderr
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    result = invoke("validate", empty)
    assert result.exit_code == 1 and "no records" in result.stdout


def test_python_dash_m_and_console_script_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "memento", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "validate" in done.stdout and "inspect" in done.stdout
    assert callable(cli.main)


def test_the_help_listing_shows_each_commands_own_summary() -> None:
    """`memento --help` lists cli.COMMANDS without importing the commands: each entry must name the
    module that holds the command and repeat the first paragraph of its help."""
    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    for name, entry in cli.COMMANDS.items():
        command = group.get_command(ctx, name)
        assert command is not None and command.name == name
        assert inspect.cleandoc(command.help or "").split("\n\n")[0] == entry.summary, name
    for module_name in {entry.module for entry in cli.COMMANDS.values()}:
        module = importlib.import_module(f"memento.cli.{module_name}")
        listed = {name for name, entry in cli.COMMANDS.items() if entry.module == module_name}
        assert set(typer.main.get_group(module.app).list_commands(ctx)) == listed


def test_help_and_validate_import_neither_torch_nor_the_other_commands(good_jsonl: Path) -> None:
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from memento.cli import app\n"
        "for args in (['--help'], ['validate', sys.argv[1]]):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "    print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('memento.cli.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(good_jsonl)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "['memento.cli.common', 'memento.cli.validate']"]


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------


def test_inspect_prints_units_and_counts(good_jsonl: Path) -> None:
    result = invoke("inspect", good_jsonl, "--record", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "good.jsonl · line 3" in out
    assert "prompt · 2 tokens" in out and "p three" in out
    assert "unit 1 · block 5 tokens · memento 1 tokens · memento/block 0.20" in out
    assert "<|block_start|> 1 + 2 = 3 <|block_end|>" in out
    assert "<|summary_start|> three <|summary_end|>" in out
    assert "unit 3 · block 3 tokens · memento 1 tokens" in out
    assert "<|block_start|> alpha beta gamma <|block_end|>" in out
    assert "(no answer)" in out
    assert "3 units · 10 block tokens → 3 memento tokens (compression 3.33×)" in out
    assert "domain: math" in out and "difficulty: 2" in out


def test_inspect_bad_record_prints_defect_exits_1(tmp_path: Path) -> None:
    bad = dict(RECORDS[0], response=RECORDS[0]["response"].replace("<|summary_end|>", "", 1))
    path = write_jsonl(tmp_path / "b.jsonl", [json.dumps(RECORDS[1]), json.dumps(bad)])
    result = invoke("inspect", path, "-r", "2")
    assert result.exit_code == 1
    pos = bad["response"].index("<|block_start|>", 10)
    assert f"✗ line 2: position {pos}: <|block_start|> inside the memento of block 1 (no <|summary_end|>)" in (
        result.stdout
    )
    assert "▶ <|block_start|> e f g h i j" in result.stdout  # the context around the defect


def test_inspect_out_of_range_record_exits_2(good_jsonl: Path, tmp_path: Path) -> None:
    result = invoke("inspect", good_jsonl, "--record", "7")
    assert result.exit_code == 2
    assert "no line 7" in result.stderr and "it has 3 lines" in result.stderr
    parquet = tmp_path / "d.parquet"
    write_records(parquet, RECORDS)
    result = invoke("inspect", parquet, "--record", "3")
    assert result.exit_code == 2 and "no row 3" in result.stderr
    result = invoke("inspect", parquet, "--record", "2")
    assert result.exit_code == 0 and "alpha beta gamma" in result.stdout


def test_inspect_mask_png(good_jsonl: Path, tmp_path: Path) -> None:
    import matplotlib.image

    png = tmp_path / "mask.png"
    result = invoke("inspect", good_jsonl, "--record", "1", "--mask-png", png)
    assert result.exit_code == 0, result.output
    assert png.is_file()
    image = matplotlib.image.imread(str(png))
    assert image.shape == (1230, 1575, 4)  # 10.5 x 8.2 inches at 150 dpi, RGBA
    assert image[..., :3].std() > 0.05  # not a blank canvas
    # prompt "p one" is 2 regex pieces and the response 31: 33 tokens in all
    assert "wrote" in result.stdout and "33 tokens" in result.stdout

    restart_png = tmp_path / "restart.png"
    result = invoke("inspect", good_jsonl, "-r", "3", "--mask-png", restart_png, "--restart", "--max-tokens", "20")
    assert result.exit_code == 0, result.output
    assert "rows in the restart layout" in result.stdout and "20 shown" in result.stdout
    assert matplotlib.image.imread(str(restart_png)).shape == (1230, 1575, 4)


def test_inspect_bad_knobs_exit_2(good_jsonl: Path, tmp_path: Path) -> None:
    png = tmp_path / "m.png"
    result = invoke("inspect", good_jsonl, "-r", "1", "--mask-png", png, "--restart", "--keep-last-n", "1")
    assert result.exit_code == 2
    assert "restart mode is defined for keep_last_n=0" in result.stderr
    assert not png.exists()


# ----------------------------------------------------------------------------------------------
# the mask picture's ingredients
# ----------------------------------------------------------------------------------------------


def _visibility(trace: MementoTrace[str], **knobs):
    from memento.masking import MaskConfig, compute_visibility

    tok = RegexTokenizer()
    ids = tok.encode(render_response(trace))
    return tok, ids, compute_visibility(ids, tok.specials, MaskConfig(**knobs))


def test_token_roles_and_ticks() -> None:
    from memento.viz import Role, token_roles, unit_ticks

    trace = MementoTrace.new("", [(" a b ", " m "), (" c ", " n ")], "ok")
    tok, ids, vis = _visibility(trace)
    pieces = tok.pieces(render_response(trace))
    roles = token_roles(ids, tok.specials)
    by_piece = list(zip(pieces, (Role(r).name for r in roles), strict=True))
    assert by_piece == [
        ("<think>", "PROMPT"),
        ("\n", "PROMPT"),
        ("<|block_start|>", "BLOCK_DELIMITER"),
        (" a", "BLOCK"),
        (" b", "BLOCK"),
        (" ", "BLOCK"),
        ("<|block_end|>", "BLOCK_DELIMITER"),
        ("<|summary_start|>", "MEMENTO"),
        (" m", "MEMENTO"),
        (" ", "MEMENTO"),
        ("<|summary_end|>", "MEMENTO"),
        ("\n", "PROMPT"),
        ("<|block_start|>", "BLOCK_DELIMITER"),
        (" c", "BLOCK"),
        (" ", "BLOCK"),
        ("<|block_end|>", "BLOCK_DELIMITER"),
        ("<|summary_start|>", "MEMENTO"),
        (" n", "MEMENTO"),
        (" ", "MEMENTO"),
        ("<|summary_end|>", "MEMENTO"),
        ("\n", "PROMPT"),
        ("</think>", "PROMPT"),
        ("\nok", "ANSWER"),
    ]
    assert unit_ticks(vis, ids, tok.specials) == [(2, "B1"), (7, "M1"), (12, "B2"), (16, "M2"), (22, "A")]


def test_mask_summary_and_image_agree_with_the_dense_mask() -> None:
    from memento.viz import HIDDEN_COLOUR, ROLE_COLOURS, Role, _rgb, mask_image, mask_summary, row_roles

    trace = MementoTrace.new("", [(" a b ", " m "), (" c ", " n ")], "ok")
    _, ids, vis = _visibility(trace)
    dense = vis.dense().numpy()
    np.testing.assert_array_equal(vis.live_kv(), dense.sum(axis=1))
    summary = mask_summary(vis)
    n = len(ids)
    assert summary["tokens"] == summary["rows"] == n == 23
    # block 1's content (tokens 3..5) is hidden from its <|summary_end|> (10) on: rows 10..22;
    # block 2's content (13, 14) from its <|summary_end|> (19) on: rows 19..22
    assert summary["visible_fraction"] == pytest.approx((n * (n + 1) // 2 - 3 * 13 - 2 * 4) / (n * (n + 1) // 2))
    assert summary["peak_live_kv"] == int(dense.sum(axis=1).max())
    roles = row_roles(vis, np.zeros(n, dtype=np.int64) + Role.BLOCK)
    image = mask_image(vis, roles, max_tokens=12)
    assert image.shape == (12, 12, 3)
    np.testing.assert_allclose(image[11, 4], _rgb(HIDDEN_COLOUR))  # row 11 (after M1's end) no longer sees 'b'
    np.testing.assert_allclose(image[9, 4], _rgb(ROLE_COLOURS[Role.BLOCK]))  # the memento still does
    np.testing.assert_allclose(image[0, 5], 1.0)  # the future is white


def test_restart_rows_mark_recomputed_copies() -> None:
    from memento.viz import Role, row_roles, token_roles

    trace = MementoTrace.new("", [(" a b ", " m "), (" c ", " n ")], "ok")
    tok, ids, vis = _visibility(trace, restart=True)
    roles = row_roles(vis, token_roles(ids, tok.specials))
    # each memento's 3 tokens (<|summary_start|>, ' m', ' ') are recomputed before its <|summary_end|>
    assert len(vis) == len(ids) + 6
    assert int((roles == Role.MEMENTO_RECOMPUTED).sum()) == 6


def test_hf_tokenizer_directory_counts(good_jsonl: Path, tmp_path: Path) -> None:
    """--tokenizer DIR: a tiny word-level HF tokenizer with the special tokens, saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from memento.format import SPECIAL_TOKENS

    words = [*"abcdefghijklmnopqrstuvwxyz123+=", "three", "alpha", "beta", "gamma", "delta"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tok_dir = tmp_path / "tok"
    fast.save_pretrained(str(tok_dir))

    result = invoke("validate", good_jsonl, "--tokenizer", tok_dir, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["stats"]
    assert stats["tokenizer"] == {"name": str(tok_dir), "approximate": False}
    # whitespace-split words: the same block counts as the regex pieces here
    assert (stats["block_tokens"]["total"], stats["memento_tokens"]["total"]) == (28, 8)

    png = tmp_path / "hf.png"
    result = invoke("inspect", good_jsonl, "-r", "2", "--tokenizer", tok_dir, "--mask-png", png)
    assert result.exit_code == 0, result.output
    assert png.is_file() and "approximate" not in result.stdout

    result = invoke("validate", good_jsonl, "--tokenizer", tmp_path)
    assert result.exit_code == 2 and "cannot load the tokenizer" in result.stderr
