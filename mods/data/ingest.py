"""Ingestion: any instruction-data shape in, canonical rows + quarantine + accounting out.

``ingest(sources, config)`` reads files, folders and globs (see ``mods.data.readers``),
recognises each record's shape, maps it to the canonical schema (``mods.data.schema``),
validates it, drops evaluation-set overlaps, merges duplicates and accounts for
every row:  read = kept + duplicates + quarantined + decontaminated, per file.

The unit of "read" is a candidate row: one per record, except self-instruct tasks,
which give one row per instance (a task with no instances is one quarantined row).

Per record: ``mods.data.shapes`` recognises the shape and maps it to candidate rows;
``mods.data.text`` validates text fields (quarantine reasons) and gives the normalised
row id that merges duplicates. This module runs them over the sources and accounts.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from mods.core.files import INGEST_REPORT_JSON, QUARANTINE_PARQUET, ROWS_PARQUET
from mods.data import schema as S
from mods.data.config import IngestConfig
from mods.data.conversations import WHOLE_CONVERSATION, column_messages, dumps, exchange_messages
from mods.data.decontam import build_index
from mods.data.readers import RawRecord, Source, SourceError, discover, read_source
from mods.data.shapes import candidates
from mods.data.text import Quarantine, conversation_id, row_id, safe_text


class IngestError(Exception):
    """Nothing usable, or a source that cannot be read: the message is one line."""


class AccountingError(IngestError):
    """read != kept + duplicates + quarantined + decontaminated for some file (a bug)."""


@dataclass
class IngestResult:
    rows: pd.DataFrame
    quarantine: pd.DataFrame
    report: dict


# ---------------------------------------------------------------- the run


def _file_stats() -> dict[str, Any]:
    return {"read": 0, "kept": 0, "duplicates": 0, "quarantined": 0, "decontaminated": 0,
            "records": 0, "shapes": Counter(), "warnings": []}


def ingest(
    sources: Sequence[str | Path],
    config: IngestConfig | None = None,
    progress: bool = True,
) -> IngestResult:
    """Read, map, validate, decontaminate and deduplicate; every row is accounted for.

    Raises IngestError (one line) for sources that cannot be read, an unknown shape,
    a mapping to a field that no record has, or when nothing at all was read.
    """
    cfg = config or IngestConfig()
    t0 = time.perf_counter()
    try:
        srcs = discover(list(sources))
    except SourceError as e:
        raise IngestError(str(e)) from None
    for src in srcs:  # file names with undecodable bytes
        src.name = safe_text(src.name)

    # column-wise buffers: far smaller than a list of dicts for 100k+ rows
    cols: dict[str, list] = {c: [] for c in S.ROW_COLUMNS}
    metas: list[dict] = []
    exact_keys: list[int] = []
    quarantine: list[tuple[str, int, str, str, str]] = []
    stats: dict[str, dict[str, Any]] = {}
    fields_seen: set[str] = set()
    whole = cfg.turn == "conversation"
    dropped_turns: Counter[str] = Counter()  # turns dropped from kept conversations, by reason
    trimmed = 0  # rows read that lost turns

    total_bytes = sum(s.size for s in srcs)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading", disable=not progress, leave=False)
    for src in srcs:
        st = stats[src.name] = _file_stats()
        base = bar.n

        def on_progress(done: int, base: int = base, src: Source = src) -> None:
            bar.n = base + min(done, src.size)
            bar.refresh()

        recognised = 0
        objects = 0
        keys_seen: Counter[str] = Counter()
        try:
            for rec in read_source(src, on_progress):
                st["records"] += 1
                if rec.error is not None:
                    quarantine.append((src.name, rec.line, rec.error[0], rec.error[1], _raw(rec)))
                    st["read"] += 1
                    st["quarantined"] += 1
                    continue
                if isinstance(rec.obj, dict):
                    objects += 1
                    if objects <= 1000:  # enough to name the fields in an error message
                        keys_seen.update(str(k) for k in rec.obj)
                    fields_seen.update(str(k).lower() for k in rec.obj)
                for c in candidates(rec.obj, cfg):
                    st["read"] += 1
                    if isinstance(c, Quarantine):
                        if c.reason != "unknown_shape":
                            recognised += 1
                        quarantine.append((src.name, rec.line, c.reason, f"{_where(src, rec)}: {c.detail}", _raw(rec)))
                        st["quarantined"] += 1
                        continue
                    recognised += 1
                    st["shapes"][c.meta["shape"]] += 1
                    # A conversation that is more than one plain exchange (later turns, a system
                    # message) is marked so every stage reads it whole; a plain exchange is the
                    # row `first` gives, with its id: its scores, answers and training are the same.
                    conversation = whole and c.messages != exchange_messages(c.instruction, c.input, c.output)
                    if conversation:
                        c.meta[WHOLE_CONVERSATION] = True
                    for d in c.meta.get("dropped", ()):
                        dropped_turns[d["reason"]] += 1
                    trimmed += "dropped" in c.meta
                    cols[S.SOURCE].append(src.name)
                    cols[S.SOURCE_LINE].append(rec.line)
                    cols[S.INSTRUCTION].append(c.instruction)
                    cols[S.INPUT].append(c.input)
                    cols[S.OUTPUT].append(c.output)
                    cols[S.HISTORY].append(json.dumps(c.history, ensure_ascii=False))
                    cols[S.MESSAGES].append(dumps(c.messages))
                    metas.append(c.meta)
                    if conversation:  # the id and exact copies follow the whole conversation
                        cols[S.ID].append(conversation_id(c.messages))
                        exact_keys.append(hash(cols[S.MESSAGES][-1]))
                    else:
                        cols[S.ID].append(row_id(c.instruction, c.input, c.output, c.history, c.later))
                        exact_keys.append(hash((c.instruction, c.input, c.output, cols[S.HISTORY][-1])))
        except SourceError as e:
            bar.close()
            raise IngestError(str(e)) from None
        if objects and not recognised:
            bar.close()
            fields = ", ".join(k for k, _ in keys_seen.most_common(12))
            raise IngestError(
                f"{src.name}: no record has a known shape (fields: {fields}); "
                "map them, e.g. --map instruction=FIELD --map output=FIELD"
            )
        st["warnings"] = list(src.warnings)
    bar.close()

    for canon, field_name in cfg.field_mapping.items():
        if fields_seen and field_name.lower() not in fields_seen:
            raise IngestError(
                f"mapping {canon}={field_name}: no record has a field {field_name!r} "
                f"(fields seen: {', '.join(sorted(fields_seen)[:15])})"
            )

    n = len(cols[S.ID])
    if not n and not quarantine:
        empty = [s.name for s in srcs]
        raise IngestError(f"nothing to ingest: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} "
                          f"{'is' if len(empty) == 1 else 'are'} empty")

    # ---- decontamination (before dedup, so every contaminated copy is counted as such)
    dropped = [False] * n
    if cfg.decontaminate_against and n:
        try:
            index = build_index(list(cfg.decontaminate_against), cfg.decontamination_ngram, cfg.decontamination_threshold)
        except SourceError as e:
            raise IngestError(f"decontamination set: {e}") from None
        instr_col, inp_col = cols[S.INSTRUCTION], cols[S.INPUT]
        for i in tqdm(range(n), desc="decontaminating", disable=not progress, leave=False):
            if whole:  # every user turn of the conversation is a prompt
                texts = [m["content"] for m in json.loads(cols[S.MESSAGES][i]) if m["role"] == "user"]
            else:
                texts = [instr_col[i] + "\n" + inp_col[i] if inp_col[i] else instr_col[i]]
            hit = next((h for h in map(index.match, texts) if h is not None), None)
            if hit is not None:
                dropped[i] = True
                src_name, line = cols[S.SOURCE][i], cols[S.SOURCE_LINE][i]
                quarantine.append((
                    src_name, line, "decontaminated",
                    f"{src_name}:{line}: overlaps evaluation item {index.describe(hit[1])} "
                    f"({hit[0]:.0%} of {cfg.decontamination_ngram}-grams)",
                    json.dumps({"instruction": instr_col[i], "input": inp_col[i], "output": cols[S.OUTPUT][i]},
                               ensure_ascii=False)[: S.RAW_MAX_CHARS],
                ))
                stats[src_name]["decontaminated"] += 1

    # ---- duplicates: same normalised content = same id; the first copy is kept
    first: dict[str, int] = {}
    keep = [False] * n
    n_exact = n_norm = 0
    for i in range(n):
        if dropped[i]:
            continue
        rid = cols[S.ID][i]
        j = first.get(rid)
        if j is None:
            first[rid] = i
            keep[i] = True
            continue
        exact = exact_keys[i] == exact_keys[j]
        n_exact += exact
        n_norm += not exact
        metas[j].setdefault("duplicates", []).append(
            {"source": cols[S.SOURCE][i], "source_line": cols[S.SOURCE_LINE][i], "exact": exact}
        )
        stats[cols[S.SOURCE][i]]["duplicates"] += 1

    for i in range(n):
        if keep[i]:
            stats[cols[S.SOURCE][i]]["kept"] += 1
    idx = [i for i in range(n) if keep[i]]
    rows = pd.DataFrame({c: [cols[c][i] for i in idx] for c in S.ROW_COLUMNS if c != S.METADATA})
    rows[S.METADATA] = [safe_text(json.dumps(metas[i], ensure_ascii=False, default=str)) for i in idx]
    rows = rows[list(S.ROW_COLUMNS)]
    rows[S.SOURCE_LINE] = rows[S.SOURCE_LINE].astype("int64")
    # undecodable bytes survive as lone surrogates until here; Arrow strings refuse them
    qdf = pd.DataFrame([(s, ln, r, safe_text(d), safe_text(raw)) for s, ln, r, d, raw in quarantine],
                       columns=list(S.QUARANTINE_COLUMNS))
    qdf[S.SOURCE_LINE] = qdf[S.SOURCE_LINE].astype("int64")

    report = _report(stats, qdf, cfg, n_exact, n_norm, time.perf_counter() - t0)
    report["dropped_turns"] = dict(sorted(dropped_turns.items()))
    report["rows_with_dropped_turns"] = trimmed
    check_accounting(report)
    return IngestResult(rows=rows.reset_index(drop=True), quarantine=qdf, report=report)


def _where(src: Source, rec: RawRecord) -> str:
    return f"{src.name}: {src.unit} {rec.line}"


def _raw(rec: RawRecord) -> str:
    raw = rec.raw_text()
    return raw if len(raw) <= S.RAW_MAX_CHARS else raw[: S.RAW_MAX_CHARS] + f"... [{len(raw)} chars]"


def _report(stats: dict, qdf: pd.DataFrame, cfg: IngestConfig, n_exact: int, n_norm: int, elapsed: float) -> dict:
    keys = ("read", "kept", "duplicates", "quarantined", "decontaminated")
    files = {}
    for name, st in stats.items():
        files[name] = {k: int(st[k]) for k in (*keys, "records")}
        files[name]["shapes"] = dict(st["shapes"])
        if st["warnings"]:
            files[name]["warnings"] = st["warnings"]
    totals = {k: sum(f[k] for f in files.values()) for k in keys}
    reasons = qdf[S.REASON].value_counts().to_dict() if len(qdf) else {}
    return {
        **totals,
        "records": sum(f["records"] for f in files.values()),
        "duplicates_exact": n_exact,
        "duplicates_normalised": n_norm,
        "quarantine_reasons": {k: int(v) for k, v in sorted(reasons.items())},
        "files": files,
        "config": cfg.model_dump(),
        "seconds": round(elapsed, 3),
    }


def check_accounting(report: dict) -> None:
    """Fail loudly when read != kept + duplicates + quarantined + decontaminated."""
    for name, f in [("total", report), *report["files"].items()]:
        parts = f["kept"] + f["duplicates"] + f["quarantined"] + f["decontaminated"]
        if f["read"] != parts:
            raise AccountingError(
                f"{name}: accounting does not add up: read {f['read']} != kept {f['kept']} + duplicates "
                f"{f['duplicates']} + quarantined {f['quarantined']} + decontaminated {f['decontaminated']}"
            )


# ---------------------------------------------------------------- writing


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_ingest(result: IngestResult, out_dir: Path) -> None:
    """rows.parquet, quarantine.parquet and ingest_report.json, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = pa.Table.from_pandas(result.rows, schema=S.ROW_SCHEMA, preserve_index=False)
    quar = pa.Table.from_pandas(result.quarantine, schema=S.QUARANTINE_SCHEMA, preserve_index=False)
    _atomic(out_dir / ROWS_PARQUET, lambda p: pq.write_table(rows, p))
    _atomic(out_dir / QUARANTINE_PARQUET, lambda p: pq.write_table(quar, p))
    _atomic(out_dir / INGEST_REPORT_JSON,
            lambda p: p.write_text(json.dumps(result.report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))


def read_rows(out_dir: Path) -> pd.DataFrame:
    """The canonical rows written by write_ingest (for the pipeline's later steps); rows
    written before the ``messages`` column existed get it, rebuilt from their other columns."""
    path = Path(out_dir) / ROWS_PARQUET
    if S.MESSAGES in pq.read_schema(path).names:
        return pq.read_table(path, schema=S.ROW_SCHEMA).to_pandas()
    rows = pq.read_table(path, schema=pa.schema([f for f in S.ROW_SCHEMA if f.name != S.MESSAGES])).to_pandas()
    rows[S.MESSAGES] = [dumps(column_messages(r)) for r in rows.to_dict("records")]
    return rows


def format_report(report: dict) -> str:
    """The accounting as a plain table, one line per source file plus the total."""
    keys = ("read", "kept", "duplicates", "quarantined", "decontaminated")
    names = list(report["files"])
    width = min(max([len(n) for n in names] + [5]), 70)
    lines = [f"{'source':<{width}} " + " ".join(f"{k:>14}" for k in keys)]
    for name, f in report["files"].items():
        shown = name if len(name) <= width else "..." + name[-(width - 3):]
        lines.append(f"{shown:<{width}} " + " ".join(f"{f[k]:>14,}" for k in keys))
    lines.append(f"{'TOTAL':<{width}} " + " ".join(f"{report[k]:>14,}" for k in keys))
    if report.get("quarantine_reasons"):
        lines.append("quarantine reasons: " + ", ".join(f"{k} {v:,}" for k, v in report["quarantine_reasons"].items()))
    if report.get("dropped_turns"):
        lines.append(f"turns dropped from {report['rows_with_dropped_turns']:,} kept conversations: "
                     + ", ".join(f"{k} {v:,}" for k, v in report["dropped_turns"].items()))
    for name, f in report["files"].items():
        for w in f.get("warnings", []):
            lines.append(f"warning: {name}: {w}")
    return "\n".join(lines)
