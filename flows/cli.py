"""`mods` command line: the whole flow (`mods run`) and one subcommand per stage on plain files.

Per-stage subcommands call the core (no Prefect, no workspace) so they work alone, for
users and for dedicated workers. User errors end with a one-line message, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

# Offline by design: no model hub, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class UserError(Exception):
    """A problem with what the user gave: printed as one line, exit status 2."""


def _load_rows(data: list[str], args: argparse.Namespace):
    """Canonical rows from any supported source (files are validated like `mods ingest`)."""
    from mods.ingest import IngestConfig, ingest

    result = ingest(data, IngestConfig(), progress=not args.quiet)
    if result.quarantine is not None and len(result.quarantine):
        print(f"note: {len(result.quarantine)} rows quarantined (run `mods ingest` to see why)", file=sys.stderr)
    if result.rows.empty:
        raise UserError(f"no usable rows in {', '.join(data)}")
    return result.rows


def _write_parquet(frame, out: str) -> None:
    from mods.artifacts import write_parquet

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(frame, path)
    print(f"wrote {len(frame)} rows to {path}")


def cmd_run(args: argparse.Namespace) -> int:
    from mods.config import load_config, set_dotted

    overrides: dict[str, Any] = {}
    for item in args.set or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected section.field=value")
        key, value = item.split("=", 1)
        set_dotted(overrides, key.strip(), value)
    if args.data:
        overrides["data"] = args.data
    if args.workspace:
        overrides["workspace"] = args.workspace
    if args.quiet:
        overrides.setdefault("execution", {})["progress"] = False
    try:
        config = load_config(args.config, overrides)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise UserError(f"configuration: {error}".replace("\n", "; ")) from None

    from flows.mods_pipeline import mods_pipeline

    result = mods_pipeline(config=config)
    print("\nMoDS selection finished.")
    print(f"  selected data (Alpaca JSONL): {result['selected_jsonl']}")
    print(f"  selected data + provenance:   {result['selected_parquet']}")
    print(f"  report:                       {result['report']}")
    print(f"  coverage plot:                {result['coverage_png']}")
    print(f"  final adapter/model:          {result['final_model']}")
    return 0


def cmd_prepare_models(args: argparse.Namespace) -> int:
    from mods.models import prepare_default_models

    paths = prepare_default_models()
    for name, path in (paths.items() if isinstance(paths, dict) else enumerate(paths)):
        print(f"{name}: {path}")
    return 0


def _scorer_config(args: argparse.Namespace):
    from mods.scoring import ScorerConfig

    values = {"kind": args.scorer, "model": args.model}
    if args.batch_size:
        values["batch_size"] = args.batch_size
    if args.max_length:
        values["max_length"] = args.max_length
    return ScorerConfig(**{k: v for k, v in values.items() if v is not None})


def cmd_score(args: argparse.Namespace) -> int:
    from mods.scoring import build_scorer

    rows = _load_rows(args.data, args)
    scores = build_scorer(_scorer_config(args)).score(
        rows["instruction"].tolist(), rows["input"].tolist(), rows["output"].tolist(), progress=not args.quiet
    )
    for column in scores.columns:
        rows[column] = scores[column].to_numpy()
    _write_parquet(rows, args.out)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from mods.embedding import EmbeddingConfig, embed_texts, embedding_texts, embeddings_table

    rows = _load_rows(args.data, args)
    config = EmbeddingConfig(model=args.model, text=args.text)
    vectors = embed_texts(embedding_texts(rows, config.text), config, progress=not args.quiet)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(embeddings_table(rows["id"].tolist(), vectors), args.out)
    print(f"wrote {len(rows)} embeddings of dimension {vectors.shape[1]} to {args.out}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    import pandas as pd

    from mods.embedding import read_embeddings
    from mods.kcenter import k_center_greedy
    from mods.stages import selection_frame

    if not Path(args.embeddings).is_file():
        raise UserError(f"{args.embeddings}: no such file (make one with `mods embed`)")
    ids, vectors = read_embeddings(Path(args.embeddings))
    position = {row_id: i for i, row_id in enumerate(ids)}
    already: list[int] = []
    if args.already_selected:
        chosen = pd.read_parquet(args.already_selected)["id"].tolist()
        unknown = [i for i in chosen if i not in position]
        if unknown:
            raise UserError(f"--already-selected: {len(unknown)} ids are not in {args.embeddings}, e.g. {unknown[0]}")
        already = [position[i] for i in chosen]
    try:
        result = k_center_greedy(vectors, args.k, already_selected=already, seed=args.seed, device=args.device)
    except ValueError as error:
        raise UserError(str(error)) from None
    frame = selection_frame(ids, result)
    _write_parquet(frame, args.out)
    if len(result.radii):
        print(f"coverage radius after {len(result.radii)} picks: {float(result.radii[-1]):.4f}")
    return 0


def _train_config(args: argparse.Namespace):
    from mods.training import TrainConfig

    values = {"method": args.method, "epochs": args.epochs, "learning_rate": args.learning_rate,
              "batch_size": args.batch_size, "max_length": args.max_length, "device": args.device}
    return TrainConfig(**{k: v for k, v in values.items() if v is not None})


def cmd_train(args: argparse.Namespace) -> int:
    from mods.training import train_model

    rows = _load_rows(args.data, args)
    summary = train_model(args.base_model, rows, _train_config(args), Path(args.out), progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    print(f"model written to {args.out}")
    return 0


def cmd_necessity(args: argparse.Namespace) -> int:
    from mods.generation import GenerationConfig, generate_answers
    from mods.scoring import build_scorer
    from mods.training import load_trained_model

    if not Path(args.model_dir).is_dir():
        raise UserError(f"--model-dir {args.model_dir}: not a folder (a `mods train` output or a local HF model)")
    rows = _load_rows(args.data, args)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size, device=args.device)
    model, tokenizer = load_trained_model(args.model_dir, device=args.device)
    answers = generate_answers(model, tokenizer, rows["instruction"].tolist(), rows["input"].tolist(), config,
                               progress=not args.quiet)
    del model
    scores = build_scorer(_scorer_config(args)).score(
        rows["instruction"].tolist(), rows["input"].tolist(), answers, progress=not args.quiet
    )
    rows["model_answer"] = answers
    rows["necessity_score"] = scores["quality_score"].to_numpy()
    _write_parquet(rows, args.out)
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_scorer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scorer", choices=["likelihood", "reward-model"], default="likelihood",
                        help="likelihood (offline default, SmolLM2) or reward-model (a local HF "
                             "sequence-classification folder, as in the paper)")
    parser.add_argument("--model", dest="model", default=None, help="scorer model folder (required for reward-model)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mods", description="MoDS: model-oriented data selection for instruction tuning")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline (Prefect flow; cached stages are skipped)")
    run.add_argument("--data", nargs="+", help="files, folders or globs (default: the embedded ShareGPT demo pool)")
    run.add_argument("--config", help="YAML file of PipelineConfig values (see configs/)")
    run.add_argument("--workspace", help="artifact folder (default: work)")
    run.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                     help="override one value, e.g. --set quality.alpha=0 --set seed_selection.k=100")
    _add_common(run)
    run.set_defaults(handler=cmd_run)

    prep = sub.add_parser("prepare-models", help="convert/cache the packaged offline models")
    prep.set_defaults(handler=cmd_prepare_models)

    from mods import cli_ingest

    cli_ingest.register(sub)

    score = sub.add_parser("score", help="add a quality_score column to DATA")
    score.add_argument("data", nargs="+", metavar="DATA")
    score.add_argument("--out", required=True, help="output .parquet")
    _add_scorer(score)
    _add_common(score)
    score.set_defaults(handler=cmd_score)

    embed = sub.add_parser("embed", help="embed DATA's instructions (id, embedding) for `mods select`")
    embed.add_argument("data", nargs="+", metavar="DATA")
    embed.add_argument("--out", required=True, help="output .parquet")
    embed.add_argument("--model", default="all-minilm-l6-v2")
    embed.add_argument("--text", default="instruction", choices=["instruction", "instruction+input"])
    _add_common(embed)
    embed.set_defaults(handler=cmd_embed)

    select = sub.add_parser("select", help="k-center greedy selection over an embeddings file")
    select.add_argument("embeddings", help="a .parquet written by `mods embed`")
    select.add_argument("--k", type=int, required=True)
    select.add_argument("--out", required=True, help="output .parquet (id, pick_order, pick_distance, radius_after)")
    select.add_argument("--already-selected", help="a .parquet with an id column: rows that count as centers")
    select.add_argument("--seed", type=int, default=0)
    select.add_argument("--device", default=None)
    _add_common(select)
    select.set_defaults(handler=cmd_select)

    train = sub.add_parser("train", help="fine-tune a base LLM (LoRA by default) on DATA")
    train.add_argument("data", nargs="+", metavar="DATA")
    train.add_argument("--out", required=True, help="output folder (adapter or model)")
    train.add_argument("--base-model", default="smollm2-135m-instruct")
    train.add_argument("--method", choices=["lora", "full"])
    train.add_argument("--epochs", type=float)
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--max-length", type=int)
    train.add_argument("--device", default=None)
    _add_common(train)
    train.set_defaults(handler=cmd_train)

    nec = sub.add_parser("necessity", help="a trained model answers DATA; answers are scored (necessity_score)")
    nec.add_argument("data", nargs="+", metavar="DATA")
    nec.add_argument("--model-dir", dest="model_dir", required=True, help="a `mods train` output or a local HF causal LM")
    nec.add_argument("--out", required=True, help="output .parquet")
    nec.add_argument("--max-new-tokens", type=int, default=96)
    nec.add_argument("--gen-batch-size", type=int, default=16)
    nec.add_argument("--device", default=None)
    _add_scorer(nec)
    _add_common(nec)
    nec.set_defaults(handler=cmd_necessity)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return int(handler(args) or 0)
    except UserError as error:
        print(f"mods {args.command}: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as error:
        # Errors raised by the core for bad inputs carry a readable message.
        print(f"mods {args.command}: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
