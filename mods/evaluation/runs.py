"""The pipeline run being evaluated, and the baselines trained beside its selection.

A finished run is found by its ``export`` artifact (``latest_export``); its completion
marker lists the run's other artifacts (``pipeline_inputs``), whose markers give the
settings the baselines are trained with (``run_settings``). The MoDS selection is seed ∪
augmented (``selection_ids``); each baseline has its size (``baseline_rows``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mods.core.artifacts import artifact_problem, read_marker
from mods.core.files import ROWS_PARQUET, SELECTED_PARQUET
from mods.core.stage import read_table
from mods.data.conversations import answer_chars
from mods.evaluation.config import Baseline
from mods.scoring.config import ScorerConfig
from mods.selection.budgets import count_tokens
from mods.selection.kcenter import k_center_greedy
from mods.training.config import TrainConfig

MODS = "mods"


# --- the pipeline run being evaluated ---------------------------------------------------------


def latest_export(workspace_root: Path, export_key: str | None = None) -> str:
    """The key of the named, else the most recently finished, complete export artifact."""
    folder = Path(workspace_root) / "artifacts" / "export"
    if export_key:
        if artifact_problem(folder / export_key) is not None:
            raise ValueError(f"no complete export artifact {export_key!r} in {folder}")
        return export_key
    finished = []
    for path in folder.glob("*") if folder.is_dir() else []:
        if path.name.startswith(".") or artifact_problem(path) is not None:
            continue
        finished.append((read_marker(path).get("finished_at", ""), path.stat().st_mtime, path.name))
    if not finished:
        raise ValueError(f"no finished pipeline run in {workspace_root} (no complete export artifact): "
                         "run `mods run` (or `make run`) with this workspace first")
    return max(finished)[2]


def pipeline_inputs(workspace_root: Path, export_key: str) -> dict[str, dict[str, str]]:
    """The export artifact's input artifacts, {stage: {"stage", "key"}}, plus the export itself."""
    marker = read_marker(Path(workspace_root) / "artifacts" / "export" / export_key)
    found = {stage: {"stage": stage, "key": key} for stage, key in marker["inputs"].items()}
    needed = {"sample", "quality", "high_quality", "embed", "seed_select", "augment_select", "final_train"}
    missing = sorted(needed - set(found))
    if missing:
        raise ValueError(f"export {export_key} does not list the input artifacts {missing}; rerun the pipeline")
    return {**found, "export": {"stage": "export", "key": export_key}}


def selection_ids(seed_selected: pd.DataFrame, augment_selected: pd.DataFrame) -> list[str]:
    """The MoDS selection: seed ∪ augmented, deduplicated, in pick order."""
    return list(dict.fromkeys([*seed_selected["id"].astype(str), *augment_selected["id"].astype(str)]))


# --- what the flow needs from the run being evaluated --------------------------------------------


def run_settings(workspace_root: Path, run: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """The run's final-training settings, quality scorer, seed-selection seed and selection size,
    read from its artifacts' completion markers."""
    def folder(stage: str) -> Path:
        return Path(workspace_root) / "artifacts" / stage / run[stage]["key"]

    training = read_marker(folder("final_train"))["params"]
    scorer = read_marker(folder("quality"))["params"]
    scorer = scorer.get("scorer", scorer)  # {"scorer": {...}} (typed stage parameters) or the scorer itself
    seed_params = read_marker(folder("seed_select"))["params"]
    augment_params = read_marker(folder("augment_select"))["params"]
    selection = selection_ids(read_table(folder("seed_select"), SELECTED_PARQUET),
                              read_table(folder("augment_select"), SELECTED_PARQUET))
    tokens = None
    if seed_params.get("tokens") is not None or augment_params.get("tokens") is not None:
        # Sized in tokens: the `longest` baseline gets as many tokens as the selection.

        rows = read_table(folder("high_quality"), ROWS_PARQUET).drop_duplicates("id").set_index("id")
        tokens = int(count_tokens(training["base_model"], rows.loc[selection].reset_index()).sum())
    return {"base_model": training["base_model"], "train": TrainConfig.model_validate(training["train"]),
            "scorer": ScorerConfig.model_validate(scorer), "kcenter_seed": int(seed_params.get("seed", 0)),
            "selection_size": len(selection), "selection_tokens": tokens}


def compared_run_label(export_key: str) -> str:
    """The name another run of the workspace goes by in the evaluation (``compare_with``)."""
    return f"run-{export_key[:8]}"


# --- baselines ----------------------------------------------------------------------------------


def baseline_rows(
    name: Baseline,
    size: int,
    sample_rows: pd.DataFrame,
    quality_scores: pd.DataFrame,
    high_quality_rows: pd.DataFrame,
    embeddings: tuple[list[str], np.ndarray] | None,
    seed: int,
    kcenter_seed: int = 0,
    tokens: int | None = None,
    base_model: str | None = None,
) -> pd.DataFrame:
    """The rows a baseline model is trained on: ``size`` of them (all high-quality rows for ``full``).

    random       seeded draw from the sampled pool (before the quality filter)
    quality_top  the pool's ``size`` best quality scores (quality alone: no coverage, no necessity)
    seed_only    k-center over the high-quality embeddings with k = ``size``: the seed step alone,
                 grown to the selection's size (its first picks are the run's seed set)
    longest      the pool's longest answers (characters; ties by id): ``size`` rows, or, given
                 ``tokens``, rows in that order while they fit in as many tokens (base model's tokenizer)
    full         every high-quality row
    """
    if name == "full":
        return high_quality_rows.reset_index(drop=True)
    if size < 1:
        raise ValueError("the selection is empty: nothing to match a baseline's size to")
    if name == "random":
        if size > len(sample_rows):
            raise ValueError(f"random baseline: {size} rows asked for, the sampled pool has {len(sample_rows)}")
        return sample_rows.sample(n=size, random_state=seed).reset_index(drop=True)
    if name == "quality_top":
        scored = sample_rows.merge(quality_scores[["id", "quality_score"]], on="id", how="left", validate="one_to_one")
        if size > len(scored):
            raise ValueError(f"quality_top baseline: {size} rows asked for, the pool has {len(scored)}")
        order = np.argsort(-np.nan_to_num(scored["quality_score"].to_numpy(dtype=np.float64), nan=-np.inf),
                           kind="stable")
        return scored.iloc[order[:size]].drop(columns=["quality_score"]).reset_index(drop=True)
    if name == "longest":
        return longest_rows(sample_rows, size, tokens, base_model)
    if name == "seed_only":
        if embeddings is None:
            raise ValueError("seed_only baseline needs the run's embeddings")
        ids, vectors = embeddings
        if size > len(ids):
            raise ValueError(f"seed_only baseline: {size} rows asked for, {len(ids)} high-quality rows embedded")
        picks = [ids[i] for i in k_center_greedy(vectors, size, seed=kcenter_seed).indices]
        if len(set(picks)) < size:  # identical instructions: k-center stops short of size
            raise ValueError(f"seed_only baseline: only {len(set(picks))} distinct rows to pick from, {size} needed")
        return high_quality_rows.set_index("id").loc[picks].reset_index()
    raise ValueError(f"unknown baseline {name!r}")


def longest_rows(pool: pd.DataFrame, size: int, tokens: int | None = None, base_model: str | None = None) -> pd.DataFrame:
    """The ``longest`` baseline (arXiv 2402.04833: hard to beat): longest answers first (a
    conversation: all its assistant turns)."""
    lengths = answer_chars(pool).to_numpy()
    order = np.lexsort((pool["id"].astype(str).to_numpy(), -lengths))
    ranked = pool.iloc[order].reset_index(drop=True)
    if tokens is None:
        if size > len(ranked):
            raise ValueError(f"longest baseline: {size} rows asked for, the sampled pool has {len(ranked)}")
        return ranked.iloc[:size].reset_index(drop=True)

    if not base_model:
        raise ValueError("longest baseline in tokens needs the base model's tokenizer")
    costs = count_tokens(base_model, ranked)
    keep, left = [], int(tokens)
    for row, cost in enumerate(costs.tolist()):
        if cost <= left:
            keep.append(row)
            left -= cost
    return ranked.iloc[keep].reset_index(drop=True)
