"""`mods` command line: the whole flow (`mods run`), `mods verify` and `mods prepare-models`;
one command per stage on plain files is in flows/cli_stages.py, `mods ingest` in
flows/cli_ingest.py and `mods evaluate` in flows/cli_evaluate.py. Every failure ends in one
line on stderr and exit status 2 (130 for Ctrl-C); the detail goes to a log file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from flows.cli_flags import UserError
from mods.core.faults import first_line

# No telemetry. The hub is contacted only for a model named by a hub id (owner/name) that the
# Hugging Face cache lacks; HF_HUB_OFFLINE=1 (yours) forbids that. Our loggers reach the Prefect UI.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mods")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


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
    if getattr(args, "data", None):
        overrides["data"] = args.data
    if getattr(args, "workspace", None):
        overrides["workspace"] = args.workspace
    if getattr(args, "quiet", None):
        overrides.setdefault("execution", {})["progress"] = False
    if getattr(args, "verify", None):
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
    from flows.mods_pipeline import resolve_sources
    from mods.core.artifacts import check_workspace
    from mods.data.readers import SourceError, check_readable, discover

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
    if args.until is not None:
        from mods.pipeline import PIPELINE

        if args.until not in PIPELINE:
            raise UserError(f"--until {args.until}: not a stage of the pipeline ({', '.join(PIPELINE)})")
    print(config.sample_rule())
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
                result = mods_pipeline(config=config, until=args.until)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # noqa: BLE001 - every failure ends in one line
                DETAIL.error("run failed", exc_info=error)
                raise UserError(f"{first_line(error)} (details: {log_file})") from None
    finally:
        if stop_server is not None:
            stop_server()
    if "stopped_after" in result:
        print(f"\nMoDS stopped after {result['stopped_after']} (--until).")
        print(f"  its artifact:                 {result['artifact']}")
        print(f"  stages computed this run:     {', '.join(result['executed']) or 'none (all reused)'}")
        return 0
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


def cmd_plan(args: argparse.Namespace) -> int:
    """Each stage of the pipeline as `mods run` with these arguments would find it."""
    from flows.mods_pipeline import resolve_sources
    from mods.pipeline import plan_pipeline

    config = _config_from_args(args)
    workspace = _preflight(config)
    print(config.sample_rule())
    print(f"workspace: {workspace}")
    for line in plan_pipeline(config, resolve_sources(config.data)):
        print(line.line())
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
    """The packaged models, prepared; with --config (or --set), every model the configuration names
    (hub ids downloaded into the Hugging Face cache, for a node that runs offline later)."""
    from mods.models.loading import prepare_default_models, resolve_model_path

    for name, path in prepare_default_models().items():
        print(f"{name}: {path}")
    if args.config or args.set:
        for field, name in _config_from_args(args).named_models().items():
            try:
                print(f"{field} = {name}: {resolve_model_path(name, field=field)}")
            except ValueError as error:
                raise UserError(str(error)) from None
    return 0


# --- per-stage commands (the same stage functions as the flow) --------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mods", description="MoDS: model-oriented data selection for instruction tuning")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline (Prefect flow; cached stages are skipped)")
    plan = sub.add_parser("plan", help="what `mods run` with the same arguments would do: each stage cached or to "
                          "run, and rows left to compute (nothing is loaded or run)")
    for parser_ in (run, plan):
        parser_.add_argument("--data", nargs="+", help="files, folders or globs (default: the embedded ShareGPT demo pool)")
        parser_.add_argument("--config", help="YAML file of PipelineConfig values (see configs/)")
        parser_.add_argument("--workspace", help="artifact folder (default: work)")
        parser_.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                             help="override one value, e.g. --set quality.alpha=0 --set seed_selection.k=100")
        parser_.add_argument("--verify", action="store_true",
                             help="check reused artifacts' sha256 (sizes are always checked)")
    _add_common(plan)
    plan.set_defaults(handler=cmd_plan)
    run.add_argument("--until", metavar="STAGE",
                     help="stop after this stage of the pipeline, e.g. quality: score first, look at the scores "
                     "(scores.parquet), choose alpha, then run again (what is done is reused)")
    run.add_argument("--gpu-deployment", help="send GPU work to this deployment (e.g. mods-gpu-stage/gpu) on "
                                              "PREFECT_API_URL's server; default: run everything in this process")
    _add_common(run)
    run.set_defaults(handler=cmd_run)

    verify = sub.add_parser("verify", help="check every artifact of a workspace against its sizes and sha256")
    verify.add_argument("--workspace", default="work")
    _add_common(verify)
    verify.set_defaults(handler=cmd_verify)

    prep = sub.add_parser("prepare-models", help="convert/cache the packaged models; with --config, also fetch "
                          "every hub model the configuration names into the Hugging Face cache")
    prep.add_argument("--config", help="YAML file of PipelineConfig values (see configs/)")
    prep.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override one value")
    prep.set_defaults(handler=cmd_prepare_models)

    from flows import cli_ingest

    cli_ingest.register(sub)
    from flows import cli_evaluate

    cli_evaluate.register(sub)


    from flows import cli_stages

    cli_stages.register(sub, _add_common)
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
