"""`mods` command line: the whole flow (`mods run`) and one subcommand per stage on plain files.

Per-stage subcommands call the same stage functions as the flow and the GPU workers
(mods/core/engine.py compute_rows), without Prefect or a workspace. Every failure ends in one line on stderr
and exit status 2 (130 for Ctrl-C); the detail goes to a log file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mods.core.faults import first_line
from flows.cli_flags import UserError, add_flags, from_flags

# Offline by design: no model hub, no telemetry. Our own loggers reach the Prefect UI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mods")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# --- rows from files, for the per-stage commands ----------------------------------------------


def _load_rows(data: list[str], args: argparse.Namespace, keep_duplicates: bool = False):
    """Canonical rows from any supported source (validated like `mods ingest`).

    With ``keep_duplicates`` every input row comes back (exact and normalised duplicates as
    copies of their first occurrence, in input order), so a per-row command gives one
    result per input row. What was left out is said on stderr, with the reasons."""
    import pandas as pd

    from mods.ingest import IngestConfig, IngestError, ingest

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


# --- mods run ---------------------------------------------------------------------------------


def _config_from_args(args: argparse.Namespace):
    import yaml

    from mods.config import load_config, set_dotted

    overrides: dict[str, Any] = {}
    try:
        for item in args.set or []:
            if "=" not in item:
                raise UserError(f"--set {item!r}: expected section.field=value")
            key, value = item.split("=", 1)
            set_dotted(overrides, key.strip(), value)
    except yaml.YAMLError as error:
        raise UserError(f"--set {item!r}: not a YAML value ({first_line(error)})") from None
    if args.data:
        overrides["data"] = args.data
    if args.workspace:
        overrides["workspace"] = args.workspace
    if args.quiet:
        overrides.setdefault("execution", {})["progress"] = False
    if args.verify:
        overrides.setdefault("execution", {})["verify"] = True
    try:
        return load_config(args.config, overrides)
    except yaml.YAMLError as error:
        raise UserError(f"config file {args.config}: not valid YAML ({' '.join(str(error).split())})") from None
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise UserError(f"configuration: {_validation_text(error)}") from None


def _validation_text(error: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
    return first_line(error)


def _preflight(config) -> Path:
    """Everything that can be checked before a model is loaded or a server started."""
    from mods.core.artifacts import check_workspace
    from mods.readers import SourceError, check_readable, discover

    from flows.mods_pipeline import resolve_sources

    try:
        workspace = check_workspace(config.workspace)
    except ValueError as error:
        raise UserError(first_line(error)) from None
    try:
        # Every file is opened once here: one that cannot be read is named now, not by
        # the ingest stage after a server has started.
        check_readable(discover(resolve_sources(config.data)))
    except SourceError as error:
        raise UserError(f"data: {first_line(error)}") from None
    api_url = configured_api_url()
    if api_url:
        import httpx

        auth = os.environ.get("PREFECT_API_AUTH_STRING")
        try:
            response = httpx.get(api_url.rstrip("/") + "/health", timeout=10,
                                 auth=tuple(auth.split(":", 1)) if auth and ":" in auth else None)
            response.raise_for_status()
        except Exception as error:  # noqa: BLE001 - any failure here means "unreachable"
            raise UserError(f"cannot reach the Prefect server at PREFECT_API_URL={api_url} ({first_line(error)}); "
                            "start it, or unset PREFECT_API_URL (environment or Prefect profile) "
                            "to use a temporary local one") from None
    return workspace


def configured_api_url() -> str | None:
    """The Prefect server this process is set to report to: PREFECT_API_URL from the
    environment or the active Prefect profile (``prefect config set``), or a settings
    context around the call; None when there is none."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


class _OneLineConsole(logging.Formatter):
    """Console lines without tracebacks: the detail is in the log file."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        return text.splitlines()[0] if text else text


class _QuietFailures(logging.Filter):
    """Prefect's own error records (task and flow failures) stay out of the console: the
    command ends with its one-line message instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.name.startswith("prefect"))


# Detail that belongs in the log file only (not the console, not the Prefect API).
DETAIL = logging.getLogger("mods-run-detail")


def _route_logs(log_file: Path) -> None:
    """All detail to ``log_file``; the console keeps one line per record and no tracebacks."""
    import prefect  # noqa: F401 - configures logging first

    root = logging.getLogger()
    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for handler in list(root.handlers):
        handler.setFormatter(_OneLineConsole(handler.formatter))
        handler.addFilter(_QuietFailures())
    root.handlers.insert(0, file_handler)
    DETAIL.addHandler(file_handler)
    DETAIL.propagate = False
    logging.getLogger("mods").setLevel(logging.INFO)
    for name in ("prefect", "mods"):
        logger = logging.getLogger(name)
        if file_handler not in logger.handlers and not logger.propagate:
            logger.addHandler(file_handler)


def _die_with_parent() -> None:
    """In the server's process, before it starts: Linux sends it SIGTERM when the `mods run`
    that started it dies, even by kill -9, so no orphaned server is left behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the atexit handler still stops it on a normal exit
        pass


def _start_local_server() -> tuple[Any, Callable[[], None]]:
    """A temporary Prefect server in its own session, so that Ctrl-C in a terminal (SIGINT
    to the whole foreground group) stops the run, not the server the run reports to; it
    ends with its parent whatever way the parent ends. Returns (server, stop)."""
    import socket
    import subprocess
    from unittest import mock

    import prefect.server.api.server as server_module

    # A server of its own, on a port of its own: Prefect keeps one shared "default" server
    # per process (SubprocessASGIServer()), and stopping that one at the end of the run
    # would stop whatever else in the process uses it (a test harness did). Prefect restarts
    # on another port if this one is taken before the server binds it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_module.SubprocessASGIServer(port=port)
    real_popen = subprocess.Popen

    def popen(*popen_args: Any, **kwargs: Any):
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("preexec_fn", _die_with_parent)
        return real_popen(*popen_args, **kwargs)

    with mock.patch.object(server_module.subprocess, "Popen", popen):
        server.start()
    # While the run lasts it is also the default, as Prefect's own test harness does: a
    # Prefect thread that misses the run's settings finds it instead of starting another.
    instances = server_module.SubprocessASGIServer._instances
    prior_default = instances.get(None)
    if prior_default is None or not prior_default.running:
        instances[None] = server

    def stop() -> None:
        _drain_prefect_clients()
        server.stop()
        if instances.get(None) is server:
            if prior_default is None:
                del instances[None]
            else:
                instances[None] = prior_default

    return server, stop


def _drain_prefect_clients() -> None:
    """Send the logs and events still queued, then stop sending: after the temporary server
    is gone, nothing may try to reach it (each try prints an error at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler, APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=5)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            for handler in [h for h in logger.handlers if isinstance(h, APILogHandler)]:
                logger.removeHandler(handler)


def cmd_run(args: argparse.Namespace) -> int:
    from mods.core.faults import catching_interrupts

    with catching_interrupts():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    if args.gpu_deployment:
        from flows.executors import GPU_DEPLOYMENT_ENV

        os.environ[GPU_DEPLOYMENT_ENV] = args.gpu_deployment
    workspace = _preflight(config)
    log_dir = workspace / "logs"
    log_dir.mkdir(exist_ok=True)
    log_file = log_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    _route_logs(log_file)

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.mods_pipeline import mods_pipeline

    server, stop_server = None, None
    try:
        if not configured_api_url():
            try:
                server, stop_server = _start_local_server()
            except Exception as error:  # noqa: BLE001
                DETAIL.exception("temporary Prefect server failed")
                raise UserError(f"could not start a temporary Prefect server ({first_line(error)}); details: {log_file}") from None
        settings = {PREFECT_API_URL: server.api_url} if server else {}
        with temporary_settings(settings):
            try:
                result = mods_pipeline(config=config)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # noqa: BLE001 - every failure ends in one line
                DETAIL.error("run failed", exc_info=error)
                raise UserError(f"{first_line(error)} (details: {log_file})") from None
    finally:
        if stop_server is not None:
            stop_server()
    print("\nMoDS selection finished.")
    print(f"  selected data (Alpaca JSONL): {result['selected_jsonl']}")
    print(f"  the same as OpenAI messages:  {result['selected_messages_jsonl']}")
    print(f"  the same as ShareGPT:         {result['selected_sharegpt_jsonl']}")
    print(f"  selected data + provenance:   {result['selected_parquet']}")
    print(f"  report:                       {result['report']}")
    print(f"  coverage plot:                {result['coverage_png']}")
    print(f"  final adapter/model:          {result['final_model']}")
    print(f"  stages computed this run:     {', '.join(result['executed']) or 'none (all reused)'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every artifact of a workspace against its marker (sizes and sha256); a file
    or folder that cannot be read counts as damaged. Exit status 1 when any is."""
    from mods.core.artifacts import Workspace, artifact_problem

    ws = Workspace(args.workspace)
    root = ws.root / "artifacts"
    if not root.is_dir():
        raise UserError(f"{ws.root} has no artifacts folder; is it a workspace?")
    folders: list[Path] = []
    damaged = 0
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            folders += [p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError as error:  # a stage folder that cannot be listed hides its artifacts
            damaged += 1
            print(f"damaged  {stage_dir.relative_to(ws.root)}: unreadable: {stage_dir} ({error.strerror or error})")
    folders.sort()
    for folder in folders:
        problem = artifact_problem(folder, verify_hashes=True)
        if problem is not None:
            damaged += 1
            print(f"damaged  {folder.relative_to(ws.root)}: {problem}")
        elif problem is None and not args.quiet:
            print(f"ok       {folder.relative_to(ws.root)}")
    print(f"{len(folders)} artifacts checked, {damaged} damaged" + (" (the next run rebuilds them)" if damaged else ""))
    return 1 if damaged else 0


def cmd_prepare_models(args: argparse.Namespace) -> int:
    from mods.models import prepare_default_models

    for name, path in prepare_default_models().items():
        print(f"{name}: {path}")
    return 0


# --- per-stage commands (the same stage functions as the flow) --------------------------------


def cmd_score(args: argparse.Namespace) -> int:
    from mods.core.engine import compute_rows
    from mods.scoring import ScorerConfig
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
    from mods.embedding import EmbeddingConfig, embedding_texts, embeddings_table

    rows = _load_rows(args.data, args, keep_duplicates=True)
    config = from_flags(args, EmbeddingConfig, "embedding")
    work = rows.assign(text=embedding_texts(rows, config.text, config.conversation))
    vectors = np.stack(compute_rows("embed", config, work, progress=not args.quiet)["embedding"].tolist())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(embeddings_table(rows["id"].tolist(), vectors), args.out)
    print(f"wrote {len(rows)} embeddings of dimension {vectors.shape[1]} to {args.out}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    import pandas as pd

    from mods.embedding import read_embeddings
    from mods.kcenter import k_center_greedy
    from mods.selection import selection_frame

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
    _write_parquet(selection_frame(ids, result), args.out)
    if len(result.radii):
        print(f"coverage radius after {len(result.radii)} picks: {float(result.radii[-1]):.4f}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import shutil

    from mods.training import TrainConfig, train_fitting_memory

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
    from mods.generation import GenerationConfig
    from mods.scoring import ScorerConfig
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


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# The scorer's kind is --scorer on the command line (--model is the scorer's model).
SCORER_FLAGS = {"kind": "scorer"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mods", description="MoDS: model-oriented data selection for instruction tuning")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline (Prefect flow; cached stages are skipped)")
    run.add_argument("--data", nargs="+", help="files, folders or globs (default: the embedded ShareGPT demo pool)")
    run.add_argument("--config", help="YAML file of PipelineConfig values (see configs/)")
    run.add_argument("--workspace", help="artifact folder (default: work)")
    run.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                     help="override one value, e.g. --set quality.alpha=0 --set seed_selection.k=100")
    run.add_argument("--verify", action="store_true", help="check reused artifacts' sha256 (sizes are always checked)")
    run.add_argument("--gpu-deployment", help="send GPU work to this deployment (e.g. mods-gpu-stage/gpu) on "
                                              "PREFECT_API_URL's server; default: run everything in this process")
    _add_common(run)
    run.set_defaults(handler=cmd_run)

    verify = sub.add_parser("verify", help="check every artifact of a workspace against its sizes and sha256")
    verify.add_argument("--workspace", default="work")
    _add_common(verify)
    verify.set_defaults(handler=cmd_verify)

    prep = sub.add_parser("prepare-models", help="convert/cache the packaged offline models")
    prep.set_defaults(handler=cmd_prepare_models)

    from flows import cli_ingest

    cli_ingest.register(sub)
    from flows import cli_evaluate

    cli_evaluate.register(sub)

    from mods.config import PipelineConfig
    from mods.models import DEFAULT_BASE_MODEL
    from mods.embedding import EmbeddingConfig
    from mods.generation import GenerationConfig
    from mods.scoring import ScorerConfig
    from mods.training import TrainConfig

    score = sub.add_parser("score", help="add a quality_score column to DATA (one score per input row)")
    score.add_argument("data", nargs="+", metavar="DATA")
    score.add_argument("--out", required=True, help="output .parquet")
    add_flags(score, ScorerConfig, rename=SCORER_FLAGS)
    _add_common(score)
    score.set_defaults(handler=cmd_score)

    embed = sub.add_parser("embed", help="embed DATA's instructions (id, embedding) for `mods select`")
    embed.add_argument("data", nargs="+", metavar="DATA")
    embed.add_argument("--out", required=True, help="output .parquet")
    add_flags(embed, EmbeddingConfig)
    _add_common(embed)
    embed.set_defaults(handler=cmd_embed)

    select = sub.add_parser("select", help="k-center greedy selection over an embeddings file")
    select.add_argument("embeddings", help="a .parquet written by `mods embed`")
    select.add_argument("--k", type=int, required=True, help="rows to pick")
    select.add_argument("--out", required=True, help="output .parquet (id, pick_order, pick_distance, radius_after)")
    select.add_argument("--already-selected", help="a .parquet with an id column: rows that count as centers")
    select.add_argument("--seed", type=int, default=0, help="seed of the first pick (default: 0)")
    select.add_argument("--device", default=None, help="'cpu', 'cuda', or empty for automatic")
    _add_common(select)
    select.set_defaults(handler=cmd_select)

    train = sub.add_parser("train", help="fine-tune a base LLM (LoRA by default) on DATA")
    train.add_argument("data", nargs="+", metavar="DATA")
    train.add_argument("--out", required=True, help="output folder (adapter or model)")
    train.add_argument("--base-model", default=DEFAULT_BASE_MODEL,
                       help=f"{PipelineConfig.model_fields['base_model'].description} (default: {DEFAULT_BASE_MODEL})")
    add_flags(train, TrainConfig)
    _add_common(train)
    train.set_defaults(handler=cmd_train)

    nec = sub.add_parser("necessity", help="a trained model answers DATA; answers are scored (necessity_score)")
    nec.add_argument("data", nargs="+", metavar="DATA")
    nec.add_argument("--model-dir", dest="model_dir", required=True, help="a `mods train` output or a local HF causal LM")
    nec.add_argument("--out", required=True, help="output .parquet (seed_answer, turn_answers, necessity_score, turn_scores)")
    add_flags(nec, GenerationConfig, rename={"batch_size": "gen_batch_size"})
    add_flags(nec, ScorerConfig, rename=SCORER_FLAGS)
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
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"mods {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the core's errors carry a readable message
        print(f"mods {args.command}: {first_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
