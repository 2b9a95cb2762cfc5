"""`mods score`, `mods embed`, `mods select`, `mods train`, `mods necessity`, `mods ifd`: one command per
stage on plain files, calling the same stage code as the flow and the GPU workers
(``mods.core.engine.compute_rows``, ``mods.stages.coverage.pick_set``, ``train_fitting_memory``),
without Prefect or a workspace. Their flags come from the parameter models (flows/cli_flags.py).
Like the rest of the command line, each imports what it runs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from flows.cli_flags import UserError, add_flags, from_flags
from mods.core.faults import first_line

# The scorer's kind is --scorer on the command line (--model is the scorer's model).
SCORER_FLAGS = {"kind": "scorer"}


# --- rows from files, for the per-stage commands ----------------------------------------------


def _load_rows(data: list[str], args: argparse.Namespace, keep_duplicates: bool = False):
    """Canonical rows from any supported source (validated like `mods ingest`).

    With ``keep_duplicates`` every input row comes back (exact and normalised duplicates as
    copies of their first occurrence, in input order), so a per-row command gives one
    result per input row. What was left out is said on stderr, with the reasons."""
    import pandas as pd

    from mods.data.ingest import IngestConfig, IngestError, ingest

    try:
        result = ingest(data, IngestConfig(), progress=not args.quiet)
    except IngestError as error:
        raise UserError(first_line(error)) from None
    quarantine = result.quarantine
    if quarantine is not None and len(quarantine):
        reasons = quarantine["reason"].value_counts()
        said = ", ".join(f"{count} {reason}" for reason, count in reasons.items())
        print(f"note: {len(quarantine)} input rows left out ({said}); `mods ingest` lists them with line numbers",
              file=sys.stderr)
    rows = result.rows
    if rows.empty:
        raise UserError(f"no usable rows in {', '.join(data)}")
    if keep_duplicates:
        copies = []
        for position, metadata in enumerate(rows["metadata"]):
            for duplicate in json.loads(metadata or "{}").get("duplicates", []):
                copy = rows.iloc[position].copy()
                copy["source"], copy["source_line"] = duplicate["source"], duplicate["source_line"]
                copies.append(copy)
        if copies:
            print(f"note: {len(copies)} duplicate input rows share the result of their first copy (same id)",
                  file=sys.stderr)
            rows = pd.concat([rows, pd.DataFrame(copies)], ignore_index=True)
            rows = rows.sort_values(["source", "source_line"], kind="stable").reset_index(drop=True)
    return rows


def _write_parquet(frame, out: str) -> None:
    from mods.core.artifacts import write_parquet

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(frame, path)
    print(f"wrote {len(frame)} rows to {path}")




# --- the commands -----------------------------------------------------------------------------


def cmd_score(args: argparse.Namespace) -> int:
    from mods.core.engine import compute_rows
    from mods.scoring.config import ScorerConfig
    from mods.stages.quality import ScoringParams

    rows = _load_rows(args.data, args, keep_duplicates=True)
    scorer = from_flags(args, ScorerConfig, "scorer")
    scores = compute_rows("quality", ScoringParams(scorer=scorer), rows, progress=not args.quiet)
    for column in scores.columns:
        rows[column] = scores[column].to_numpy()
    _write_parquet(rows, args.out)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow.parquet as pq

    from mods.core.engine import compute_rows
    from mods.models.embedding import EmbeddingConfig, embedding_texts, embeddings_table

    rows = _load_rows(args.data, args, keep_duplicates=True)
    config = from_flags(args, EmbeddingConfig, "embedding")
    work = rows.assign(text=embedding_texts(rows, config.text, config.conversation))
    vectors = np.stack(compute_rows("embed", config, work, progress=not args.quiet)["embedding"].tolist())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(embeddings_table(rows["id"].tolist(), vectors), args.out)
    print(f"wrote {len(rows)} embeddings of dimension {vectors.shape[1]} to {args.out}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """The seed_select stage's selection over an embeddings file: its parameters are the
    flags (k-center by default; a token budget or another coverage method reads --rows)."""
    import pandas as pd

    from mods.config import SeedSelectionConfig
    from mods.models.embedding import read_embeddings
    from mods.selection.coverage_methods import CoverageConfig
    from mods.stages.coverage import SeedSelectParams, pick_set

    if not Path(args.embeddings).is_file():
        raise UserError(f"{args.embeddings}: no such file (make one with `mods embed`)")
    selection = from_flags(args, SeedSelectionConfig, "select")
    params = SeedSelectParams(**selection.model_dump(), coverage=from_flags(args, CoverageConfig, "coverage").method_fields(),
                              base_model=args.base_model if selection.tokens is not None else None)
    ids, vectors = read_embeddings(Path(args.embeddings))
    position = {row_id: i for i, row_id in enumerate(ids)}
    already: list[int] = []
    if args.already_selected:
        chosen = pd.read_parquet(args.already_selected)["id"].tolist()
        unknown = [i for i in chosen if i not in position]
        if unknown:
            raise UserError(f"--already-selected: {len(unknown)} ids are not in {args.embeddings}, e.g. {unknown[0]}")
        already = [position[i] for i in chosen]

    def rows_of(chosen: list[str]) -> pd.DataFrame:
        if not args.rows:
            raise UserError(f"--method {params.coverage.method}, --tokens and source caps read the candidates' rows: "
                            "give --rows (a rows.parquet with their id, instruction, input, output, source, quality_score)")
        rows = pd.read_parquet(args.rows).drop_duplicates("id").set_index("id")
        missing = [i for i in chosen if i not in rows.index]
        if missing:
            raise UserError(f"--rows: {len(missing)} ids of {args.embeddings} are not in {args.rows}, e.g. {missing[0]}")
        return rows.loc[chosen].reset_index()

    try:
        picked = pick_set(params, vectors, ids, rows_of, already=already, device=args.device)
    except ValueError as error:
        raise UserError(str(error)) from None
    if picked.capped:
        raise UserError(f"--k {params.k}, but only {picked.k} rows are distinct and not already selected")
    _write_parquet(picked.frame, args.out)
    if picked.radius is not None:
        print(f"coverage radius after {picked.k} picks: {picked.radius:.4f}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import shutil

    from mods.training.config import TrainConfig
    from mods.training.train import train_fitting_memory

    rows = _load_rows(args.data, args)
    config = from_flags(args, TrainConfig, "train")
    out = Path(args.out)
    # Beside the output, so an interrupted run resumes when the same command is run again.
    checkpoints = out.parent / f".{out.name}.checkpoints"
    summary = train_fitting_memory(args.base_model, rows, config, out, checkpoints, progress=not args.quiet)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the model is complete: nothing left to resume
    print(json.dumps(summary, indent=2))
    print(f"model written to {args.out}")
    return 0


def cmd_necessity(args: argparse.Namespace) -> int:
    from mods.core.engine import compute_rows, release_models
    from mods.generation.config import GenerationConfig
    from mods.scoring.config import ScorerConfig
    from mods.stages.necessity import AnswersParams
    from mods.stages.quality import ScoringParams

    if not Path(args.model_dir).is_dir():
        raise UserError(f"--model-dir {args.model_dir}: not a folder (a `mods train` output or a local HF model)")
    rows = _load_rows(args.data, args, keep_duplicates=True)
    generation = from_flags(args, GenerationConfig, "generation")
    scoring = ScoringParams(scorer=from_flags(args, ScorerConfig, "scorer"))
    answers = compute_rows("answers", AnswersParams(**generation.model_dump()), rows,
                           folders={"seed_model": Path(args.model_dir)},
                           progress=not args.quiet)
    rows["seed_answer"] = answers["seed_answer"].to_numpy()
    rows["turn_answers"] = list(answers["turn_answers"])  # a conversation row: one per assistant turn
    release_models()
    scores = compute_rows("necessity", scoring, rows, progress=not args.quiet)
    rows["necessity_score"] = scores["quality_score"].to_numpy()
    rows["turn_scores"] = list(scores["turn_scores"])
    _write_parquet(rows, args.out)
    return 0


def cmd_ifd(args: argparse.Namespace) -> int:
    """The ifd stage on files: the model's instruction-following difficulty of each row's answer."""
    from mods.core.engine import compute_rows
    from mods.scoring.ifd import IFD_COLUMNS, IfdConfig
    from mods.stages.necessity import IfdParams

    if not Path(args.model_dir).is_dir():
        raise UserError(f"--model-dir {args.model_dir}: not a folder (a `mods train` output or a local HF model)")
    rows = _load_rows(args.data, args, keep_duplicates=True)
    params = IfdParams(enabled=True, **from_flags(args, IfdConfig, "ifd").model_dump())
    scores = compute_rows("ifd", params, rows, folders={"seed_model": Path(args.model_dir)}, progress=not args.quiet)
    for column in IFD_COLUMNS:
        rows[column] = scores[column].to_numpy()
    _write_parquet(rows, args.out)
    return 0


def register(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    from mods.config import PipelineConfig, SeedSelectionConfig
    from mods.generation.config import GenerationConfig
    from mods.models.embedding import EmbeddingConfig
    from mods.models.loading import DEFAULT_BASE_MODEL
    from mods.scoring.config import ScorerConfig
    from mods.scoring.ifd import IfdConfig
    from mods.selection.coverage_methods import CoverageConfig
    from mods.training.config import TrainConfig

    score = sub.add_parser("score", help="add a quality_score column to DATA (one score per input row)")
    score.add_argument("data", nargs="+", metavar="DATA")
    score.add_argument("--out", required=True, help="output .parquet")
    add_flags(score, ScorerConfig, rename=SCORER_FLAGS)
    add_common(score)
    score.set_defaults(handler=cmd_score)

    embed = sub.add_parser("embed", help="embed DATA's instructions (id, embedding) for `mods select`")
    embed.add_argument("data", nargs="+", metavar="DATA")
    embed.add_argument("--out", required=True, help="output .parquet")
    add_flags(embed, EmbeddingConfig)
    add_common(embed)
    embed.set_defaults(handler=cmd_embed)

    select = sub.add_parser("select", help="the seed selection (k-center greedy by default) over an embeddings file")
    select.add_argument("embeddings", help="a .parquet written by `mods embed`")
    select.add_argument("--out", required=True, help="output .parquet (id, pick_order, pick_distance, radius_after)")
    select.add_argument("--already-selected", help="a .parquet with an id column: rows that count as centers")
    select.add_argument("--rows", help="the candidates' rows (.parquet: id, instruction, input, output, source, "
                        "quality_score): what a token budget or another coverage method reads")
    select.add_argument("--device", default=None, help="k-center: 'cpu', 'cuda', or empty for automatic")
    add_flags(select, SeedSelectionConfig)
    add_flags(select, CoverageConfig)
    select.add_argument("--base-model", default=DEFAULT_BASE_MODEL,
                        help=f"the tokenizer that counts --tokens (default: {DEFAULT_BASE_MODEL})")
    add_common(select)
    select.set_defaults(handler=cmd_select)

    train = sub.add_parser("train", help="fine-tune a base LLM (LoRA by default) on DATA")
    train.add_argument("data", nargs="+", metavar="DATA")
    train.add_argument("--out", required=True, help="output folder (adapter or model)")
    train.add_argument("--base-model", default=DEFAULT_BASE_MODEL,
                       help=f"{PipelineConfig.model_fields['base_model'].description} (default: {DEFAULT_BASE_MODEL})")
    add_flags(train, TrainConfig)
    add_common(train)
    train.set_defaults(handler=cmd_train)

    nec = sub.add_parser("necessity", help="a trained model answers DATA; answers are scored (necessity_score)")
    nec.add_argument("data", nargs="+", metavar="DATA")
    nec.add_argument("--model-dir", dest="model_dir", required=True, help="a `mods train` output or a local HF causal LM")
    nec.add_argument("--out", required=True, help="output .parquet (seed_answer, turn_answers, necessity_score, turn_scores)")
    add_flags(nec, GenerationConfig, rename={"batch_size": "gen_batch_size"})
    add_flags(nec, ScorerConfig, rename=SCORER_FLAGS)
    add_common(nec)
    nec.set_defaults(handler=cmd_necessity)

    ifd = sub.add_parser("ifd", help="a trained model's instruction-following difficulty of DATA's answers (ifd)")
    ifd.add_argument("data", nargs="+", metavar="DATA")
    ifd.add_argument("--model-dir", dest="model_dir", required=True, help="a `mods train` output or a local HF causal LM")
    ifd.add_argument("--out", required=True, help="output .parquet (loss_with_instruction, loss_answer_alone, ifd)")
    add_flags(ifd, IfdConfig)
    add_common(ifd)
    ifd.set_defaults(handler=cmd_ifd)
