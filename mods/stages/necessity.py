"""Necessity phase (MoDS step 4): the seed model answers every high-quality instruction
not in the seed set (answers, row-wise), the quality scorer scores those answers
(necessity, row-wise), and k-center picks the augmented set from the rows still needed —
below β, or the worst fraction (augment_select)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from mods.config import AugmentSelectionConfig
from mods.core.artifacts import Artifact, hash_json, write_parquet
from mods.core.stage import CPU, ONE_GPU, RowwiseStage, Stage, StageContext, read_table, register, text_cost
from mods.generation import GenerationConfig
from mods.selection import empty_selection, pickable_rows, selection_frame
from mods.stages.quality import ScoringParams, ScoringStage

log = logging.getLogger("mods.stages")


@register
class Answers(RowwiseStage[GenerationConfig]):
    name, version, resources = "answers", "2", ONE_GPU
    description = "The seed model answers every high-quality instruction not in the seed set."
    inputs = ("high_quality", "seed_select", "seed_train")
    params = GenerationConfig
    outputs = ("answers.parquet",)

    def load(self, inputs: Mapping[str, Path], params: GenerationConfig) -> pd.DataFrame:
        rows = read_table(inputs["high_quality"], "rows.parquet")
        seed_ids = set(read_table(inputs["seed_select"], "selected.parquet")["id"])
        # Seed rows are selected already; asking the model about them would only cost time.
        return rows[~rows["id"].isin(seed_ids)][["id", "instruction", "input"]].reset_index(drop=True)

    def row_keys(self, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        return rows["id"].astype(str), text_cost(rows["instruction"], rows["input"])

    def block_rows(self, params: GenerationConfig) -> int:
        return params.batch_size

    def row_fingerprint_extra(self, params: GenerationConfig, inputs: Mapping[str, Artifact]) -> list[str]:
        return [f"seed_model:{inputs['seed_train'].key}"]  # the seed model is what an answer depends on

    def setup_folders(self, inputs: Mapping[str, Path]) -> dict[str, Path]:
        return {"seed_model": Path(inputs["seed_train"]) / "model"}

    def setup(self, params: GenerationConfig, folders: Mapping[str, Path]) -> Any:
        from mods.training import load_trained_model

        return load_trained_model(folders["seed_model"], device=params.device)

    def process_batch(self, state: Any, block: pd.DataFrame, params: GenerationConfig) -> pd.DataFrame:
        from mods.generation import generate_answers

        model, tokenizer = state
        answers = generate_answers(model, tokenizer, block["instruction"].tolist(), block["input"].tolist(), params,
                                   progress=False)
        return pd.DataFrame({"seed_answer": pd.Series(answers, dtype=str)})

    def assemble(self, ctx: StageContext, params: GenerationConfig, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
        frame = pd.DataFrame({"id": rows["id"].astype(str), "instruction": rows["instruction"].astype(str),
                              "input": rows["input"].astype(str), "seed_answer": results["seed_answer"].astype(str)})
        write_parquet(frame, ctx.out / "answers.parquet")
        return {"rows": len(frame), "empty_answers": int((frame["seed_answer"].str.len() == 0).sum())}

    def empty_results(self, params: GenerationConfig) -> pd.DataFrame:
        # Nothing to answer (k at or above the high-quality rows): no seed model to load.
        return pd.DataFrame({"seed_answer": pd.Series([], dtype=str)})


def necessity_key(ids: pd.Series, answers: pd.Series) -> pd.Series:
    """A row's key for necessity: its id and the hash of the answer being scored."""
    return pd.Series([hash_json([str(i), str(a)]) for i, a in zip(ids, answers)], index=ids.index, dtype=str)


@register
class Necessity(ScoringStage):
    name = "necessity"
    description = "Score the seed model's answers with the quality scorer."
    inputs = ("answers",)
    outputs = ("necessity.parquet",)
    table, answer_column = "answers.parquet", "seed_answer"

    def row_keys(self, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        return (necessity_key(rows["id"], rows["seed_answer"]),
                text_cost(rows["instruction"], rows["input"], rows["seed_answer"]))

    def assemble(self, ctx: StageContext, params: ScoringParams, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
        frame = pd.DataFrame({"id": rows["id"].astype(str),
                              "necessity_score": results["quality_score"].to_numpy(dtype=np.float64)})
        write_parquet(frame, ctx.out / "necessity.parquet")
        return {"rows": len(frame)}

    def empty_results(self, params: ScoringParams) -> pd.DataFrame:
        # Nothing answered: the artifact has only id and necessity_score, so no scorer is loaded.
        return pd.DataFrame({"quality_score": pd.Series([], dtype=np.float64)})


@register
class AugmentSelect(Stage[AugmentSelectionConfig]):
    name, version, resources = "augment_select", "1", CPU
    description = "k-center augmented set from the rows the seed model still lacks."
    inputs = ("embed", "seed_select", "necessity")
    params = AugmentSelectionConfig
    outputs = ("selected.parquet",)

    def run(self, ctx: StageContext, params: AugmentSelectionConfig) -> dict[str, Any]:
        from mods.embedding import read_embeddings
        from mods.kcenter import k_center_greedy
        from mods.selection import keep_below

        ids, vectors = read_embeddings(ctx.inputs["embed"] / "embeddings.parquet")
        position = {row_id: i for i, row_id in enumerate(ids)}
        necessity = read_table(ctx.inputs["necessity"], "necessity.parquet")
        needed_mask = keep_below(necessity["necessity_score"].to_numpy(), params.beta, params.fraction)
        needed = necessity["id"][needed_mask].tolist()
        seed_ids = (read_table(ctx.inputs["seed_select"], "selected.parquet")["id"].tolist()
                    if params.relative_to_seed else [])
        candidate_ids = seed_ids + needed
        matrix = vectors[[position[i] for i in candidate_ids]] if candidate_ids else vectors[:0]
        already = list(range(len(seed_ids)))
        k = min(params.k, pickable_rows(matrix, already)) if needed else 0
        if k < params.k:
            log.warning("necessity.k=%d, but only %d of the %d answered rows are still needed and distinct from "
                        "the seed set: the augmented set is all of them", params.k, k, len(necessity))
        if k == 0:
            frame = empty_selection()
        else:
            result = k_center_greedy(matrix, k, already_selected=already, seed=params.seed)
            frame = selection_frame(candidate_ids, result)
        write_parquet(frame, ctx.out / "selected.parquet")
        return {"answered": len(necessity), "needed": len(needed), "k_requested": params.k, "k": k,
                "capped": k < params.k}
