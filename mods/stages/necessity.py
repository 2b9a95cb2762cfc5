"""Necessity phase (MoDS step 4): what the seed model still lacks, by one of three methods
(``necessity.method``), then the augmented set picked by the coverage method (augment_select).

- generate (the paper) and reward_gap: the seed model answers every high-quality
  instruction not in the seed set (answers, row-wise), the quality scorer scores those
  answers (necessity, row-wise); reward_gap compares that score with the pool answer's.
- ifd: the seed model's instruction-following difficulty of the pool's answers (ifd,
  row-wise, two forward passes per row); answers and necessity then have no rows.

A stage the method does not use has no rows: no model is loaded for it.

A conversation row (``ingest.turn: conversation``) is answered turn by turn: the seed model
answers each of its user turns after the real conversation before it (the pool's earlier
answers, not its own), the scorer scores each answer in that context, and the row's
necessity is its worst turn (``NECESSITY_AGGREGATE``): a conversation is needed when the
seed model fails any of its turns."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from pydantic import Field

from mods.config import AugmentSelectionConfig
from mods.core.artifacts import Artifact, hash_json, write_parquet
from mods.core.files import (
    ANSWERS_PARQUET,
    EMBEDDINGS_PARQUET,
    IFD_PARQUET,
    MODEL_DIR,
    NECESSITY_PARQUET,
    ROWS_PARQUET,
    SELECTED_PARQUET,
)
from mods.core.keys import KEY_WHEN_SET
from mods.core.stage import (
    CPU,
    ONE_GPU,
    RowwiseStage,
    Stage,
    StageContext,
    StageParams,
    read_table,
    register,
    text_cost,
)
from mods.data.conversations import row_turns, with_conversation_cost
from mods.generation.answers import AnswerEngine, open_answer_engine
from mods.generation.config import GenerationConfig
from mods.models.embedding import read_embeddings
from mods.models.loading import pick_device, torch_dtype
from mods.scoring.ifd import IFD_COLUMNS, IfdConfig, ifd_scores
from mods.scoring.scorers import score_rows
from mods.selection.cutoffs import keep_mask, score_distribution
from mods.selection.thresholds import necessity_scores
from mods.stages.coverage import CoverageFields, candidate_rows, pick_set
from mods.stages.quality import ScoringParams, ScoringStage
from mods.training.train import load_trained_model


class AnswersParams(GenerationConfig):
    answer_rows: bool = Field(True, json_schema_extra=KEY_WHEN_SET,
                              description="False when the necessity method reads no answers (ifd).")


# What the answers stage reads of a row: its exchange, and what mods.data.conversations.row_turns
# needs to tell a conversation row and to walk its turns.
ANSWERED_COLUMNS = ("id", "instruction", "input", "output", "history", "metadata", "messages")
# A conversation's necessity from its turns' scores: its worst turn (module docstring).
NECESSITY_AGGREGATE = "min"


def unselected_rows(inputs: Mapping[str, Path]) -> pd.DataFrame:
    """The high-quality rows not in the seed set (seed rows are selected already: asking
    the seed model about them would only cost time)."""
    rows = read_table(inputs["high_quality"], ROWS_PARQUET)
    seed_ids = set(read_table(inputs["seed_select"], SELECTED_PARQUET)["id"])
    return rows[~rows["id"].isin(seed_ids)].reset_index(drop=True)


log = logging.getLogger("mods.stages")


@register
class Answers(RowwiseStage[AnswersParams]):
    name, version, resources = "answers", "3", ONE_GPU
    description = "The seed model answers every high-quality instruction not in the seed set."
    inputs = ("high_quality", "seed_select", "seed_train")
    params = AnswersParams
    outputs = (ANSWERS_PARQUET,)

    def load(self, inputs: Mapping[str, Path], params: AnswersParams) -> pd.DataFrame:
        rows = unselected_rows(inputs)
        rows = rows[[c for c in ANSWERED_COLUMNS if c in rows.columns]]
        return rows if params.answer_rows else rows.iloc[:0]

    def row_keys(self, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        return rows["id"].astype(str), with_conversation_cost(rows, text_cost(rows["instruction"], rows["input"]))

    def block_rows(self, params: GenerationConfig) -> int:
        return params.batch_size

    def row_fingerprint_extra(self, params: GenerationConfig, inputs: Mapping[str, Artifact]) -> list[str]:
        return [f"seed_model:{inputs['seed_train'].key}"]  # the seed model is what an answer depends on

    def setup_folders(self, inputs: Mapping[str, Path]) -> dict[str, Path]:
        return {"seed_model": Path(inputs["seed_train"]) / MODEL_DIR}

    def setup(self, params: GenerationConfig, folders: Mapping[str, Path]) -> AnswerEngine:
        # One engine per process, kept across its shards (a vLLM start costs minutes on CPU).
        return open_answer_engine(folders["seed_model"], params)

    def process_batch(self, state: AnswerEngine, block: pd.DataFrame, params: GenerationConfig) -> pd.DataFrame:
        turns = [row_turns(row) for row in block.to_dict("records")]
        flat = [turn for row in turns for turn in row]
        contexts = [turn.context for turn in flat]
        answers = state.answer([t.instruction for t in flat], [t.input for t in flat],
                               contexts=contexts if any(contexts) else None)
        per_row, at = [], 0
        for row in turns:
            per_row.append([str(a) for a in answers[at:at + len(row)]])
            at += len(row)
        return pd.DataFrame({"seed_answer": pd.Series([a[0] for a in per_row], dtype=str),
                             "turn_answers": pd.Series(per_row, dtype=object)})

    def teardown(self, state: AnswerEngine) -> None:
        state.close()

    def assemble(self, ctx: StageContext, params: GenerationConfig, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
        # The row's columns (what necessity needs to rebuild each turn's context), then the
        # answers: seed_answer, the first turn's, and turn_answers, every turn's.
        frame = rows.reset_index(drop=True).assign(id=rows["id"].astype(str).to_numpy(),
                                                  seed_answer=results["seed_answer"].astype(str).to_numpy(),
                                                  turn_answers=list(results["turn_answers"]))
        write_parquet(frame, ctx.out / ANSWERS_PARQUET)
        turn_answers = [a for answers in frame["turn_answers"] for a in answers]
        return {"rows": len(frame), "turns": len(turn_answers),
                "empty_answers": sum(1 for a in turn_answers if not a)}

    def empty_results(self, params: GenerationConfig) -> pd.DataFrame:
        # Nothing to answer (k at or above the high-quality rows): no seed model to load.
        return pd.DataFrame({"seed_answer": pd.Series([], dtype=str), "turn_answers": pd.Series([], dtype=object)})


def necessity_key(ids: pd.Series, answers: pd.Series) -> pd.Series:
    """A row's key for necessity: its id and the hash of the answers being scored (one per turn)."""
    return pd.Series([hash_json([str(i), [str(x) for x in a]]) for i, a in zip(ids, answers)], index=ids.index,
                     dtype=str)


@register
class Necessity(ScoringStage):
    name = "necessity"
    description = "Score the seed model's answers with the quality scorer."
    inputs = ("answers",)
    outputs = (NECESSITY_PARQUET,)
    table, answer_column = ANSWERS_PARQUET, "seed_answer"

    def row_keys(self, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        return (necessity_key(rows["id"], rows["turn_answers"]),
                with_conversation_cost(rows, text_cost(rows["instruction"], rows["input"], rows["seed_answer"])))

    def process_batch(self, scorer: Any, block: pd.DataFrame, params: ScoringParams) -> pd.DataFrame:
        return score_rows(scorer, block, turn_answers=list(block["turn_answers"]), aggregate=NECESSITY_AGGREGATE)

    def assemble(self, ctx: StageContext, params: ScoringParams, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
        frame = pd.DataFrame({"id": rows["id"].astype(str).to_numpy(),
                              "necessity_score": results["quality_score"].to_numpy(dtype=np.float64),
                              "turn_scores": list(results["turn_scores"])})
        write_parquet(frame, ctx.out / NECESSITY_PARQUET)
        return {"rows": len(frame), "turns": int(sum(len(s) for s in frame["turn_scores"]))}

    def empty_results(self, params: ScoringParams) -> pd.DataFrame:
        # Nothing answered: the artifact has only id and necessity_score, so no scorer is loaded.
        return pd.DataFrame({"quality_score": pd.Series([], dtype=np.float64),
                             "turn_scores": pd.Series([], dtype=object)})


class IfdParams(IfdConfig, StageParams):
    """The necessity section's ``ifd`` settings, and whether the stage has rows at all."""

    enabled: bool = Field(False, description="Compute IFD (necessity.method 'ifd'); else the stage has no rows.")


@register
class Ifd(RowwiseStage[IfdParams]):
    name, version, resources = "ifd", "1", ONE_GPU
    description = "The seed model's instruction-following difficulty of every unselected high-quality row."
    inputs = ("high_quality", "seed_select", "seed_train")
    params = IfdParams
    outputs = (IFD_PARQUET,)

    def load(self, inputs: Mapping[str, Path], params: IfdParams) -> pd.DataFrame:
        rows = unselected_rows(inputs)[["id", "instruction", "input", "output"]]
        return rows if params.enabled else rows.iloc[:0]

    def row_keys(self, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        return rows["id"].astype(str), text_cost(rows["instruction"], rows["input"], rows["output"])

    def block_rows(self, params: IfdParams) -> int:
        return params.batch_size

    def row_fingerprint_extra(self, params: IfdParams, inputs: Mapping[str, Artifact]) -> list[str]:
        return [f"seed_model:{inputs['seed_train'].key}"]

    def setup_folders(self, inputs: Mapping[str, Path]) -> dict[str, Path]:
        return {"seed_model": Path(inputs["seed_train"]) / MODEL_DIR}

    def setup(self, params: IfdParams, folders: Mapping[str, Path]) -> Any:
        return load_trained_model(folders["seed_model"], device=params.device,
                                  dtype=torch_dtype(params.dtype, pick_device(params.device)))

    def process_batch(self, state: Any, block: pd.DataFrame, params: IfdParams) -> pd.DataFrame:
        model, tokenizer = state
        return ifd_scores(model, tokenizer, block, params.max_length)

    def assemble(self, ctx: StageContext, params: IfdParams, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
        frame = pd.DataFrame({"id": rows["id"].astype(str).to_numpy(),
                              **{c: results[c].to_numpy(dtype=np.float64) for c in IFD_COLUMNS}})
        write_parquet(frame, ctx.out / IFD_PARQUET)
        values = frame["ifd"].to_numpy()
        return {"rows": len(frame), "ifd_above_1": int((values > 1).sum()),
                "ifd_undefined": int((~np.isfinite(values)).sum())}

    def empty_results(self, params: IfdParams) -> pd.DataFrame:
        return pd.DataFrame({c: pd.Series([], dtype=np.float64) for c in IFD_COLUMNS})


class AugmentSelectParams(AugmentSelectionConfig, CoverageFields):
    pass


@register
class AugmentSelect(Stage[AugmentSelectParams]):
    name, version, resources = "augment_select", "1", CPU
    description = "The augmented set: the coverage method over the rows the seed model still lacks."
    inputs = ("embed", "seed_select", "necessity", "high_quality", "ifd")
    params = AugmentSelectParams
    outputs = (SELECTED_PARQUET,)

    def run(self, ctx: StageContext, params: AugmentSelectParams) -> dict[str, Any]:
        ids, vectors = read_embeddings(ctx.inputs["embed"] / EMBEDDINGS_PARQUET)
        position = {row_id: i for i, row_id in enumerate(ids)}
        necessity = read_table(ctx.inputs["necessity"], NECESSITY_PARQUET)
        scored, keep, set_aside = necessity_scores(params.method, necessity,
                                                   read_table(ctx.inputs["high_quality"], ROWS_PARQUET),
                                                   read_table(ctx.inputs["ifd"], IFD_PARQUET))
        scores = scored["score"].to_numpy(np.float64)
        needed_mask, cutoff = keep_mask(scores, keep, params.beta, params.beta_percentile, params.fraction)
        needed = scored["id"][needed_mask].tolist()
        seed_ids = (read_table(ctx.inputs["seed_select"], SELECTED_PARQUET)["id"].tolist()
                    if params.relative_to_seed else [])
        candidate_ids = seed_ids + needed
        matrix = vectors[[position[i] for i in candidate_ids]] if candidate_ids else vectors[:0]
        already = list(range(len(seed_ids)))
        answered = len(scored) + set_aside
        about = {"method": params.method, "set_aside": set_aside,
                 "necessity_distribution": score_distribution(scores, cutoff, keep, len(needed))}
        picked = pick_set(params, matrix, candidate_ids,
                          lambda chosen: candidate_rows(ctx.inputs["high_quality"], chosen), already=already)
        write_parquet(picked.frame, ctx.out / SELECTED_PARQUET)
        if picked.spent is not None:
            return {"answered": answered, "needed": len(needed), "k_requested": params.k, "k": picked.k,
                    **about, "coverage": picked.spent}
        if picked.capped:
            log.warning("necessity.k=%d, but only %d of the %d answered rows are still needed and distinct from "
                        "the seed set: the augmented set is all of them", params.k, picked.k, answered)
        return {"answered": answered, "needed": len(needed), "k_requested": params.k, "k": picked.k,
                "capped": picked.capped, **about}
