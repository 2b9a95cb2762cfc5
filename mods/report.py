"""Export: the selected rows in Alpaca, OpenAI ``messages`` and ShareGPT ``conversations``
JSON lines (a selected conversation whole, in each), their provenance, and the run report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from mods.core.artifacts import atomic_write_text, read_marker, write_parquet
from mods.core.files import (
    ANSWERS_PARQUET,
    COVERAGE_PNG,
    EMBEDDINGS_PARQUET,
    IFD_PARQUET,
    INGEST_REPORT_JSON,
    MODEL_DIR,
    NECESSITY_PARQUET,
    QUARANTINE_PARQUET,
    REPORT_JSON,
    REPORT_MD,
    ROWS_PARQUET,
    SCORES_PARQUET,
    SELECTED_JSONL,
    SELECTED_MESSAGES_JSONL,
    SELECTED_PARQUET,
    SELECTED_SHAREGPT_JSONL,
)
from mods.data.conversations import column_messages, row_messages, to_alpaca, to_sharegpt
from mods.models.embedding import read_embeddings
from mods.selection.coverage import plot_coverage, random_coverage_curve
from mods.selection.cutoffs import composition, composition_markdown, distribution_markdown, score_distribution


def _table(inputs: Mapping[str, Path], stage: str, filename: str) -> pd.DataFrame:
    return pd.read_parquet(Path(inputs[stage]) / filename)


def _in_workspace(folder: Path, name: str) -> str:
    """A file of another artifact, relative to the workspace root (artifacts/<stage>/<key>/name),
    so the report stays true when the workspace is moved."""
    return str(Path(*Path(folder).parts[-3:]) / name)


def selected_rows(inputs: Mapping[str, Any]) -> pd.DataFrame:
    """Seed ∪ augmented (deduplicated), in selection order, with provenance per row."""
    rows = _table(inputs, "high_quality", ROWS_PARQUET)
    seed = _table(inputs, "seed_select", SELECTED_PARQUET).assign(selected_by="seed")
    augmented = _table(inputs, "augment_select", SELECTED_PARQUET).assign(selected_by="augmented")
    picks = pd.concat([seed, augmented], ignore_index=True).drop_duplicates("id", keep="first")
    necessity = _table(inputs, "necessity", NECESSITY_PARQUET)
    answers = _table(inputs, "answers", ANSWERS_PARQUET)[["id", "seed_answer"]]
    frame = picks.merge(rows, on="id", how="left", validate="one_to_one")
    frame = frame.merge(necessity, on="id", how="left").merge(answers, on="id", how="left")
    if "ifd" in inputs:
        frame = frame.merge(_table(inputs, "ifd", IFD_PARQUET)[["id", "ifd"]], on="id", how="left")
    columns = ["id", "instruction", "input", "output", "history", "selected_by", "pick_order", "pick_distance",
               "radius_after", "quality_score", "necessity_score", "ifd", "seed_answer", "source", "source_line",
               "metadata", "messages"]
    return frame[[c for c in columns if c in frame.columns]]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def write_alpaca_jsonl(frame: pd.DataFrame, path: Path, whole_conversations: bool = False) -> None:
    """One {"instruction", "input", "output"} object per line: LLaMA-Factory and axolotl
    read it as an 'alpaca' dataset without a mapping. A row whose conversation holds more
    than its columns (turn='conversation'), or any row with a system prompt when
    ``whole_conversations``, is written whole, as LLaMA-Factory's Alpaca form of a
    conversation: last exchange, earlier pairs in ``history``, ``system``."""
    records = []
    for row in frame.to_dict("records"):
        messages = row_messages(row)
        if messages != column_messages(row) or (whole_conversations and messages[0]["role"] == "system"):
            records.append(to_alpaca(messages))
            continue
        record = {"instruction": row["instruction"], "input": row["input"], "output": row["output"]}
        history = json.loads(row.get("history", "[]") or "[]")
        if history:
            record["history"] = history
        records.append(record)
    _write_jsonl(path, records)


def write_messages_jsonl(frame: pd.DataFrame, path: Path) -> None:
    """OpenAI chat fine-tuning form, one ``{"messages": [{"role", "content"}, ...]}`` per
    row, in the order of ``selected.parquet`` (``mods.data.ingest`` reads it back as conversations)."""
    _write_jsonl(path, [{"messages": row_messages(row)} for row in frame.to_dict("records")])


def write_sharegpt_jsonl(frame: pd.DataFrame, path: Path) -> None:
    """ShareGPT form, one ``{"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}``
    per row, in the order of ``selected.parquet``."""
    _write_jsonl(path, [{"conversations": to_sharegpt(row_messages(row))} for row in frame.to_dict("records")])


def write_selection(frame: pd.DataFrame, out: Path, whole_conversations: bool = False) -> None:
    """selected.parquet (with the ``messages`` column only for ``turn='conversation'`` runs,
    so that other runs' file stays as it was) and the selection in the three JSON-lines forms."""
    parquet = frame if whole_conversations else frame.drop(columns=["messages"], errors="ignore")
    write_parquet(parquet, out / SELECTED_PARQUET)
    write_alpaca_jsonl(frame, out / SELECTED_JSONL, whole_conversations)
    write_messages_jsonl(frame, out / SELECTED_MESSAGES_JSONL)
    write_sharegpt_jsonl(frame, out / SELECTED_SHAREGPT_JSONL)


def coverage_plot(inputs: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Coverage radius against k: k-center seed picks versus random picks of equal size."""
    _, vectors = read_embeddings(Path(inputs["embed"]) / EMBEDDINGS_PARQUET)
    seed = _table(inputs, "seed_select", SELECTED_PARQUET)
    ks = np.arange(1, len(seed) + 1)
    kcenter = seed["radius_after"].to_numpy(dtype=np.float64)
    random_radii = random_coverage_curve(vectors, ks, seed=0)
    method = read_marker(Path(inputs["seed_select"]))["summary"].get("method", "k_center")
    plot_coverage(ks, kcenter, random_radii, path, title=f"Coverage of {len(vectors)} high-quality instructions",
                  label="k-center greedy" if method == "k_center" else f"{method} picks")
    return {
        "k": ks.tolist(),
        "kcenter_radius": [round(float(x), 5) for x in kcenter],
        "random_radius": [round(float(x), 5) for x in random_radii],
    }


def build_report(out: Path, inputs: Mapping[str, Path]) -> dict[str, Any]:
    """Writes the export artifact's files into ``out``; ``inputs`` are the folders of the
    pipeline's other artifacts by stage name."""
    frame = selected_rows(inputs)
    ingest_report = json.loads((Path(inputs["ingest"]) / INGEST_REPORT_JSON).read_text())
    write_selection(frame, out, (ingest_report.get("config") or {}).get("turn") == "conversation")
    coverage = coverage_plot(inputs, out / COVERAGE_PNG)

    stages = {}
    for name, folder in inputs.items():
        marker = read_marker(folder)
        # A row-wise stage's marker times its assembly; its shards' seconds are in the summary.
        seconds = marker["seconds"] + float(marker["summary"].get("shard_seconds") or 0.0)
        stages[name] = {"key": marker["key"], "seconds": round(seconds, 3), "summary": marker["summary"]}
    cutoffs = score_cutoffs(inputs, stages)
    pool_sources = _table(inputs, "sample", ROWS_PARQUET).get("source", pd.Series([], dtype=str)).unique().tolist()
    final_model = _in_workspace(inputs["final_train"], MODEL_DIR)
    counts = {
        "ingested": stages["ingest"]["summary"].get("rows"),
        "sampled": stages["sample"]["summary"].get("rows"),
        "high_quality": stages["high_quality"]["summary"].get("kept"),
        "seed": int((frame["selected_by"] == "seed").sum()),
        "answered_by_seed_model": stages["answers"]["summary"].get("rows"),
        "needed": stages["augment_select"]["summary"].get("needed"),
        "augmented": int((frame["selected_by"] == "augmented").sum()),
        "selected": len(frame),
    }
    report = {
        "counts": counts,
        "ingest": {k: ingest_report.get(k) for k in ("read", "kept", "duplicates", "quarantined", "decontaminated")},
        "stages": stages,
        "coverage": coverage,
        "cutoffs": cutoffs,
        "composition": composition(frame, pool_sources),
        # Files of this export are named relative to its folder (it is written under a
        # temporary name and renamed); other artifacts relative to the workspace root.
        "outputs": {
            "selected_jsonl": SELECTED_JSONL,
            "selected_messages_jsonl": SELECTED_MESSAGES_JSONL,
            "selected_sharegpt_jsonl": SELECTED_SHAREGPT_JSONL,
            "selected_parquet": SELECTED_PARQUET,
            "coverage_png": COVERAGE_PNG,
            "final_model": final_model,
            "quarantine": _in_workspace(inputs["ingest"], QUARANTINE_PARQUET),
        },
    }
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=2, ensure_ascii=False, default=str))
    atomic_write_text(out / REPORT_MD, render_markdown(report))
    return {"selected": len(frame), **{k: v for k, v in counts.items() if k != "selected"}, "final_model": final_model}


def score_cutoffs(inputs: Mapping[str, Path], stages: Mapping[str, Any]) -> dict[str, Any]:
    """The quality and necessity score distributions with their cut-offs (from the stages'
    summaries; a high_quality artifact from before they were recorded is measured here)."""
    quality = stages["high_quality"]["summary"].get("quality_distribution")
    if quality is None:
        values = _table(inputs, "quality", SCORES_PARQUET)["quality_score"].to_numpy(np.float64)
        summary = stages["high_quality"]["summary"]
        quality = score_distribution(values, summary.get("threshold"), "above", int(summary.get("kept") or 0))
        quality["note"] = "cut-off shown: the lowest kept score"
    augment = stages["augment_select"]["summary"]
    return {"quality": quality, "necessity": augment.get("necessity_distribution"),
            "necessity_method": augment.get("method", "generate")}


NECESSITY_SCORE_NAMES = {
    "generate": "score of the seed model's answer (needed: below the cut-off)",
    "reward_gap": "reward gap: quality of the pool's answer − score of the seed model's answer (needed: above)",
    "ifd": "IFD of the pool's answer under the seed model (needed: above; IFD > 1 set aside)",
}


def scores_markdown(report: Mapping[str, Any]) -> str:
    """Score distributions with their cut-offs and the selection's composition (a section of
    report.md, and a Prefect artifact of its own)."""
    cutoffs = report.get("cutoffs") or {}
    lines = ["## Scores and cut-offs", ""]
    if cutoffs.get("quality"):
        lines += distribution_markdown("Quality score (alpha: keep above)", cutoffs["quality"])
    if cutoffs.get("necessity"):
        method = cutoffs.get("necessity_method", "generate")
        lines += distribution_markdown(f"Necessity ({method}): {NECESSITY_SCORE_NAMES.get(method, method)}",
                                       cutoffs["necessity"])
    if report.get("composition"):
        lines += composition_markdown(report["composition"])
    return "\n".join(lines)


def render_markdown(report: Mapping[str, Any]) -> str:
    counts = report["counts"]
    lines = [
        "# MoDS selection report",
        "",
        "| step | rows |",
        "|---|---:|",
        *(f"| {name.replace('_', ' ')} | {value} |" for name, value in counts.items()),
        "",
        "## Stages",
        "",
        "Seconds of each stage's work when it was computed (a reused artifact keeps its own); for a "
        "row-wise stage, its shards' seconds summed (more than the wall time when several workers "
        "shared it) plus the assembly.",
        "",
        "| stage | key | seconds | summary |",
        "|---|---|---:|---|",
    ]
    for name, info in report["stages"].items():
        summary = ", ".join(f"{k}={v}" for k, v in info["summary"].items() if not isinstance(v, (dict, list)))
        lines.append(f"| {name} | `{info['key']}` | {info['seconds']} | {summary} |")
    coverage = report["coverage"]
    if coverage["k"]:
        lines += [
            "",
            "## Coverage",
            "",
            f"Coverage radius after {coverage['k'][-1]} seed picks: k-center {coverage['kcenter_radius'][-1]}, "
            f"random {coverage['random_radius'][-1]} (lower covers better). See `coverage.png`.",
        ]
    lines += ["", scores_markdown(report)]
    lines += ["", "## Outputs", "", *(f"- {k}: `{v}`" for k, v in report["outputs"].items()), ""]
    return "\n".join(lines)
