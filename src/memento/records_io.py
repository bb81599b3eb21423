"""Reading and writing record files: JSONL, Parquet, and HF dataset directories.

Every reader yields ``(label, record)`` pairs. The label is what a person needs to find the record
again: the 1-based line number in a JSONL file (blank lines are skipped but counted), the 0-based
row index in a Parquet file or an HF dataset. A JSONL line that is not a JSON object does not stop
the reading: it is yielded as ``(label, RecordReadError)`` so that a validator can report it and go
on. A file that cannot be read at all (missing, unknown format, unknown split) raises
:class:`RecordSourceError` before anything is yielded.

Writing (:func:`write_records`) is atomic: the records go to a temporary file beside the target,
which is renamed over it only once complete.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from memento.format import MementoFormatError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = ("jsonl", "parquet", "hf")

RecordItem = tuple[int, "dict[str, Any] | RecordReadError"]


class RecordSourceError(ValueError):
    """The file as a whole cannot be read: missing, unknown format, no such split, unreadable."""


class RecordReadError(MementoFormatError):
    """One record could not be read (e.g. a JSONL line that is not a JSON object).

    ``position`` is the character offset within the line where JSON decoding failed, if known.
    """


def detect_format(path: str | Path) -> str:
    """``"jsonl"``, ``"parquet"`` or ``"hf"`` (a ``save_to_disk`` directory), from the path."""
    p = Path(path)
    if not p.exists():
        raise RecordSourceError(f"no such file or directory: {p}")
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "hf"
        raise RecordSourceError(
            f"{p} is a directory but not an HF dataset saved with save_to_disk "
            "(no dataset_info.json, state.json or dataset_dict.json)"
        )
    name = p.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise RecordSourceError(
        f"unknown record format for {p}: expected a .jsonl/.ndjson/.json(.gz) file, a .parquet file "
        "or an HF dataset directory (datasets.Dataset.save_to_disk)"
    )


def _open_lines(path: Path) -> IO[bytes]:
    """The file as bytes (gunzipped for .gz); lines are decoded one by one, so one bad line is one error."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def _parse_jsonl_line(raw: bytes, label: int) -> dict[str, Any] | RecordReadError:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RecordReadError(f"not UTF-8 text: {exc.reason}", exc.start, record=label)
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return RecordReadError(f"not valid JSON: {exc.msg}", exc.pos, record=label)
    if not isinstance(value, dict):
        return RecordReadError(f"not a JSON object but a JSON {type(value).__name__}", record=label)
    return value


@dataclass
class RecordSource:
    """An opened record file: its format, how its labels read, how many records, and the records."""

    path: Path
    format: str
    split: str | None = None
    _cache: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path, *, split: str | None = None, format: str | None = None) -> RecordSource:
        p = Path(path)
        if format is None:
            format = detect_format(p)
        elif format not in FORMATS:
            raise RecordSourceError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
        elif not p.exists():
            raise RecordSourceError(f"no such file or directory: {p}")
        source = cls(path=p, format=format, split=split)
        if format == "hf":
            source._dataset()  # fail early on a bad directory or split
        elif format == "parquet":
            source._parquet_file()
        elif split is not None:
            raise RecordSourceError(f"--split applies to HF dataset directories, not to {format} files")
        return source

    @property
    def label_name(self) -> str:
        """How a label reads: ``line`` (JSONL, 1-based) or ``row`` (Parquet/HF, 0-based)."""
        return "line" if self.format == "jsonl" else "row"

    def describe(self, label: int) -> str:
        return f"{self.label_name} {label}"

    # -- backends ----------------------------------------------------------------------------
    def _parquet_file(self) -> Any:
        import pyarrow.parquet as pq

        if self._cache is not None:
            return self._cache
        try:
            self._cache = pq.ParquetFile(self.path)
            return self._cache
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise RecordSourceError(f"cannot read {self.path} as Parquet: {exc}") from exc

    def _dataset(self) -> Any:
        if self._cache is None:
            self._cache = self._load_dataset()
        return self._cache

    def _load_dataset(self) -> Any:
        import datasets

        try:
            loaded = datasets.load_from_disk(str(self.path))
        except Exception as exc:
            raise RecordSourceError(f"cannot load the HF dataset at {self.path}: {exc}") from exc
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded.keys())
            if self.split is not None:
                if self.split not in loaded:
                    raise RecordSourceError(f"no split {self.split!r} in {self.path}; it has {', '.join(splits)}")
                return loaded[self.split]
            if "train" in loaded:
                return loaded["train"]
            if len(splits) == 1:
                return loaded[splits[0]]
            raise RecordSourceError(f"{self.path} has splits {', '.join(splits)}: choose one with --split")
        # A single saved Dataset: accept its own split name (or 'train'), refuse anything else.
        own = str(loaded.split) if loaded.split is not None else None
        if self.split is not None and self.split not in (own, "train"):
            raise RecordSourceError(f"{self.path} holds a single dataset, not a split named {self.split!r}")
        return loaded

    # -- size ---------------------------------------------------------------------------------
    def count(self) -> int:
        """The number of records (for JSONL: of non-blank lines, counted by a quick pass)."""
        if self.format == "parquet":
            return int(self._parquet_file().metadata.num_rows)
        if self.format == "hf":
            return len(self._dataset())
        with _open_lines(self.path) as fh:
            return sum(1 for line in fh if line.strip())

    # -- reading ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[RecordItem]:
        if self.format == "jsonl":
            yield from self._iter_jsonl()
        elif self.format == "parquet":
            yield from self._iter_parquet()
        else:
            yield from self._iter_hf()

    def _iter_jsonl(self) -> Iterator[RecordItem]:
        try:
            with _open_lines(self.path) as fh:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    yield number, _parse_jsonl_line(line, number)
        except (OSError, EOFError) as exc:  # e.g. a truncated or corrupt .gz
            raise RecordSourceError(f"cannot read {self.path}: {exc}") from exc

    def _iter_parquet(self) -> Iterator[RecordItem]:
        index = 0
        for batch in self._parquet_file().iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield index, row
                index += 1

    def _iter_hf(self) -> Iterator[RecordItem]:
        dataset = self._dataset()
        index = 0
        for batch in dataset.iter(batch_size=1024):
            names = list(batch.keys())
            for values in zip(*(batch[n] for n in names), strict=True):
                yield index, dict(zip(names, values, strict=True))
                index += 1

    def get(self, label: int) -> dict[str, Any] | RecordReadError:
        """The record with this label; :class:`RecordSourceError` if there is none."""
        if self.format == "jsonl":
            last = 0
            with _open_lines(self.path) as fh:
                for number, line in enumerate(fh, start=1):
                    last = number
                    if number == label:
                        if not line.strip():
                            raise RecordSourceError(f"line {label} of {self.path} is blank")
                        return _parse_jsonl_line(line, number)
            raise RecordSourceError(f"no line {label} in {self.path}: it has {last} lines (numbered from 1)")
        total = self.count()
        if not 0 <= label < total:
            raise RecordSourceError(f"no row {label} in {self.path}: it has {total} rows (numbered from 0)")
        if self.format == "hf":
            return dict(self._dataset()[label])
        pf = self._parquet_file()
        start = 0
        for group in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if label < start + rows:
                return pf.read_row_group(group).slice(label - start, 1).to_pylist()[0]
            start += rows
        raise AssertionError("unreachable: row count and row groups disagree")


def open_records(path: str | Path, *, split: str | None = None, format: str | None = None) -> RecordSource:
    """Open a record file (format detected from the path unless given)."""
    return RecordSource.open(path, split=split, format=format)


def read_records(path: str | Path, *, split: str | None = None, format: str | None = None) -> Iterator[RecordItem]:
    """Yield ``(label, record)`` for every record; a bad JSONL line yields ``(label, RecordReadError)``.

    Raises :class:`RecordSourceError` (before yielding) when the file cannot be read at all.
    """
    return iter(open_records(path, split=split, format=format))


def write_records(path: str | Path, records: Iterable[Mapping[str, Any]], *, format: str | None = None) -> int:
    """Write records to JSONL (``.jsonl``, ``.jsonl.gz``) or Parquet, atomically; returns the count."""
    p = Path(path)
    if format is None:
        name = p.name.lower()
        if name.endswith(JSONL_SUFFIXES):
            format = "jsonl"
        elif name.endswith(PARQUET_SUFFIXES):
            format = "parquet"
        else:
            raise RecordSourceError(f"cannot tell the format of {p} from its name: use .jsonl or .parquet")
    if format not in ("jsonl", "parquet"):
        raise RecordSourceError(f"write_records writes jsonl or parquet, not {format!r}")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    _ordinary_mode(fd)
    tmp = Path(tmp_name)
    try:
        if format == "jsonl":
            count = 0
            raw = os.fdopen(fd, "wb")
            fh: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="wb") if p.name.lower().endswith(".gz") else raw
            try:
                for record in records:
                    fh.write(json.dumps(dict(record), ensure_ascii=False).encode("utf-8") + b"\n")
                    count += 1
            finally:
                fh.close()
                raw.close()
        else:
            os.close(fd)
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = [dict(r) for r in records]
            count = len(rows)
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = None) -> None:
    """Write JSON via a temp file in the same directory, fsync, then rename: a reader (or a rerun
    after a crash) sees either no file or a complete one, never a torn file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    _ordinary_mode(fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ordinary_mode(fd: int) -> None:
    """Give a temporary file the mode an ordinary new file gets (0666 less the umask): mkstemp makes
    it 0600, and the atomic rename would hand that private mode on to the data file."""
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)


def pin_settings(path: str | Path, settings: Mapping[str, Any]) -> list[str]:
    """Pin a resumable run's settings to its output: written the first time; on a rerun, the names
    of the settings that differ from the pinned ones (empty when none), so the caller can refuse
    to mix two runs in one directory."""
    current = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    p = Path(path)
    if not p.exists():
        write_json_atomic(p, current, indent=1)
        return []
    previous = json.loads(p.read_text())
    return sorted(k for k in current.keys() | previous.keys() if previous.get(k) != current.get(k))
