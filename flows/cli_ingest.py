"""`mods ingest DATA... --out DIR`: ingestion alone, with the accounting printed. Its flags
come from ``IngestConfig`` (flows/cli_flags.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.cli_flags import UserError, add_flags, from_flags
from mods.core.files import INGEST_REPORT_JSON, QUARANTINE_PARQUET, ROWS_PARQUET
from mods.data.ingest import IngestConfig, IngestError, format_report, ingest, write_ingest

# Shorter names for the decontamination flags; --map fills field_mapping.
INGEST_FLAGS = {"decontaminate_against": "decontaminate", "decontamination_ngram": "ngram",
                "decontamination_threshold": "threshold"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="read instruction data in any supported shape into canonical rows",
        description="Ingest files, folders or globs; write rows.parquet, quarantine.parquet and "
        "ingest_report.json into --out, and print the accounting.",
    )
    p.add_argument("data", nargs="+", metavar="DATA", help="files, folders or globs (JSON, JSON lines, CSV, Parquet, HF saved datasets)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--map", action="append", default=[], metavar="CANONICAL=FIELD",
                   help=IngestConfig.model_fields["field_mapping"].description + " E.g. --map output=response (repeatable).")
    add_flags(p, IngestConfig, rename=INGEST_FLAGS, skip={"field_mapping"})
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=handle_ingest)


def _config(args: argparse.Namespace) -> IngestConfig:
    mapping = {}
    for item in args.map:
        canon, sep, field = item.partition("=")
        if not sep or not canon.strip() or not field.strip():
            raise UserError(f"--map {item}: expected CANONICAL=FIELD, e.g. --map output=response")
        mapping[canon.strip()] = field.strip()
    return from_flags(args, IngestConfig, "invalid option", field_mapping=mapping)


def handle_ingest(args: argparse.Namespace) -> int:
    """Run ingestion; 0 when rows were ingested; a problem is a UserError (one line, exit 2)."""
    cfg = _config(args)
    try:
        result = ingest(args.data, cfg, progress=not args.quiet and sys.stderr.isatty())
        write_ingest(result, args.out)
    except IngestError as e:
        raise UserError(str(e)) from None
    except OSError as e:  # e.g. --out not writable
        raise UserError(f"{e.filename or args.out}: {e.strerror or e}") from None
    print(format_report(result.report))
    print(f"wrote {args.out / ROWS_PARQUET} ({result.report['kept']:,} rows), "
          f"{args.out / QUARANTINE_PARQUET}, {args.out / INGEST_REPORT_JSON}")
    if result.report["kept"] == 0:
        raise UserError(f"nothing usable: all {result.report['read']:,} rows were dropped "
                        f"(see {args.out / QUARANTINE_PARQUET})")
    return 0
