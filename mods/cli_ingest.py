"""`mods ingest DATA... --out DIR`: ingestion alone, with the accounting printed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from mods.ingest import IngestConfig, IngestError, format_report, ingest, write_ingest

EXIT_FAILURE = 2  # as every `mods` command's failures (flows/cli.py EXIT_USER_ERROR)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ingest` subcommand; its handler is set as both `func` and `handler`."""
    p = subparsers.add_parser(
        "ingest",
        help="read instruction data in any supported shape into canonical rows",
        description="Ingest files, folders or globs; write rows.parquet, quarantine.parquet and "
        "ingest_report.json into --out, and print the accounting.",
    )
    add_arguments(p)
    p.set_defaults(func=handle_ingest, handler=handle_ingest)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", metavar="DATA", help="files, folders or globs (JSON, JSON lines, CSV, Parquet, HF saved datasets)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--map", action="append", default=[], metavar="CANONICAL=FIELD",
                   help="field mapping, e.g. --map output=response (repeatable)")
    p.add_argument("--decontaminate", action="append", default=[], metavar="PATH",
                   help="evaluation set file/folder to decontaminate against (repeatable)")
    p.add_argument("--ngram", type=int, default=None, metavar="N", help="decontamination n-gram size")
    p.add_argument("--threshold", type=float, default=None, help="decontamination overlap threshold (0-1]")
    p.add_argument("--max-chars", type=int, default=None, metavar="N", help="longest allowed field (characters)")
    p.add_argument("--turn", choices=["first", "last"], default=None, help="which turn of a multi-turn row is scored")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace) -> IngestConfig:
    mapping = {}
    for item in args.map:
        canon, sep, field = item.partition("=")
        if not sep or not canon.strip() or not field.strip():
            raise IngestError(f"--map {item}: expected CANONICAL=FIELD, e.g. --map output=response")
        mapping[canon.strip()] = field.strip()
    kw: dict = {"field_mapping": mapping, "decontaminate_against": list(args.decontaminate)}
    for name, attr in (("decontamination_ngram", "ngram"), ("decontamination_threshold", "threshold"),
                       ("max_chars", "max_chars"), ("turn", "turn")):
        if getattr(args, attr) is not None:
            kw[name] = getattr(args, attr)
    try:
        return IngestConfig(**kw)
    except ValidationError as e:
        err = e.errors()[0]
        raise IngestError(f"invalid option {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def handle_ingest(args: argparse.Namespace) -> int:
    """Run ingestion; 0 when rows were ingested, 2 with a one-line message otherwise (the
    exit status of every other `mods` command's failures)."""
    try:
        cfg = _config(args)
        result = ingest(args.data, cfg, progress=not args.quiet and sys.stderr.isatty())
        write_ingest(result, args.out)
    except IngestError as e:
        print(f"mods ingest: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:  # e.g. --out not writable
        print(f"mods ingest: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    print(format_report(result.report))
    print(f"wrote {args.out / 'rows.parquet'} ({result.report['kept']:,} rows), "
          f"{args.out / 'quarantine.parquet'}, {args.out / 'ingest_report.json'}")
    if result.report["kept"] == 0:
        print(f"mods ingest: error: nothing usable: all {result.report['read']:,} rows were dropped "
              f"(see {args.out / 'quarantine.parquet'})", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m mods.cli_ingest DATA --out DIR`)."""
    parser = argparse.ArgumentParser(prog="mods ingest")
    add_arguments(parser)
    return handle_ingest(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
