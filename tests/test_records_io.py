"""Reading and writing record files: labels, bad lines, formats, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memento.records_io import (
    RecordReadError,
    RecordSourceError,
    detect_format,
    open_records,
    read_records,
    write_records,
)

RECORDS = [{"problem": f"p{i}", "response": f"r{i}", "n": i} for i in range(3)]


def test_jsonl_labels_are_line_numbers_blank_lines_counted(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"n": 0}\n\n   \n{"n": 1}\n[1, 2]\n{"n": \n', encoding="utf-8")
    items = list(read_records(path))
    assert [label for label, _ in items] == [1, 4, 5, 6]
    assert items[0][1] == {"n": 0} and items[1][1] == {"n": 1}
    not_object, not_json = items[2][1], items[3][1]
    assert isinstance(not_object, RecordReadError) and not_object.record == 5
    assert "not a JSON object" in not_object.reason and "list" in not_object.reason
    assert isinstance(not_json, RecordReadError) and not_json.record == 6
    assert not_json.reason.startswith("not valid JSON") and not_json.position == 7  # end of `{"n": \n`


def test_undecodable_line_is_one_error_not_the_end(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"n": 0}\n{"n": "caf\xe9"}\n{"n": 2}\n')
    items = list(read_records(path))
    assert [label for label, _ in items] == [1, 2, 3]
    assert items[0][1] == {"n": 0} and items[2][1] == {"n": 2}
    error = items[1][1]
    assert isinstance(error, RecordReadError) and error.reason.startswith("not UTF-8 text") and error.position == 10


def test_write_then_read_jsonl_parquet_and_gzip(tmp_path: Path) -> None:
    for name in ("x.jsonl", "x.parquet", "x.jsonl.gz"):
        path = tmp_path / name
        assert write_records(path, RECORDS) == 3
        items = list(read_records(path))
        first = 1 if name.startswith("x.jsonl") else 0
        assert [label for label, _ in items] == [first, first + 1, first + 2]
        assert [rec for _, rec in items] == RECORDS
        assert open_records(path).count() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl", "x.jsonl.gz", "x.parquet"]  # no temp files


def test_write_is_atomic_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "keep.jsonl"
    write_records(path, RECORDS)
    before = path.read_bytes()

    def broken():
        yield RECORDS[0]
        raise RuntimeError("generator failed half way")

    with pytest.raises(RuntimeError):
        write_records(path, broken())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.jsonl"]


def test_get_by_label(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n", encoding="utf-8")
    source = open_records(path)
    assert source.get(2) == RECORDS[1]
    assert source.describe(2) == "line 2"
    with pytest.raises(RecordSourceError, match="no line 9"):
        source.get(9)
    pq = tmp_path / "a.parquet"
    write_records(pq, RECORDS)
    psource = open_records(pq)
    assert psource.get(2) == RECORDS[2]
    assert psource.describe(2) == "row 2"
    with pytest.raises(RecordSourceError, match="no row 3"):
        psource.get(3)


def test_hf_dataset_dirs(tmp_path: Path) -> None:
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(single))
    assert detect_format(single) == "hf"
    assert [rec for _, rec in read_records(single)] == RECORDS
    assert open_records(single).get(1) == RECORDS[1]

    only = tmp_path / "only"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(RECORDS[:2])}).save_to_disk(str(only))
    assert [label for label, _ in read_records(only)] == [0, 1]

    two = tmp_path / "two"
    datasets.DatasetDict(
        {"validation": datasets.Dataset.from_list(RECORDS[:1]), "test": datasets.Dataset.from_list(RECORDS)}
    ).save_to_disk(str(two))
    with pytest.raises(RecordSourceError, match="choose one with --split"):
        open_records(two)
    assert len(list(read_records(two, split="test"))) == 3
    with pytest.raises(RecordSourceError, match="no split 'train'"):
        open_records(two, split="train")


def test_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(RecordSourceError, match="no such file"):
        open_records(tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(RecordSourceError, match="unknown record format"):
        open_records(tmp_path / "notes.txt")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(RecordSourceError, match="not an HF dataset"):
        open_records(tmp_path / "plain_dir")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(RecordSourceError, match="as Parquet"):
        open_records(tmp_path / "broken.parquet")
