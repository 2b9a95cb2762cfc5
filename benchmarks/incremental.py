"""What the row store saves, on the real default scorer (preference: SmolLM2 + MiniLM, this machine).

1. full:   score a pool (ingest → sample → quality) in a fresh workspace;
2. grown:  add 5% new rows to the pool, rerun in the same workspace (only new rows scored);
3. resume: in another fresh workspace, score the pool in a child process, kill -9 it at
           about half of the shards, then finish in this process.

Last line:
    incremental_ratio=X resume_ratio=Y rows_recomputed=R identical=true|false
incremental_ratio = seconds of the grown rerun / seconds of the full run (goal ≤ 0.15);
resume_ratio = seconds to finish after a kill at half the rows / seconds of the full run (goal ≤ 0.6;
shards run costliest first, then alternating, so half the rows is about half the work);
rows_recomputed = rows the grown rerun scored; identical = the resumed run's scores.parquet
has the same bytes as the uninterrupted run's.

    .venv/bin/python benchmarks/incremental.py [--rows 200] [--rows-per-shard 16]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_pools(folder: Path, rows: int) -> tuple[Path, Path]:
    """The base pool and the same pool with 5% more rows (real ShareGPT rows)."""
    from mods.data.ingest import IngestConfig, ingest
    from mods.data.readers import demo_sources

    pool = ingest(demo_sources(), IngestConfig(), progress=False).rows
    size = pool["instruction"].str.len() + pool["input"].str.len() + pool["output"].str.len()
    pool = pool[size <= 1000].sample(frac=1.0, random_state=0)
    extra = max(1, round(rows * 0.05))
    records = pool[["instruction", "input", "output"]].to_dict("records")
    base, grown = folder / "base.jsonl", folder / "grown.jsonl"
    base.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:rows]))
    grown.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[: rows + extra]))
    return base, grown


def score_pool(workspace: Path, pool: Path, rows_per_shard: int) -> tuple[float, dict]:
    """ingest → sample → quality in the core (no Prefect); seconds and the quality summary."""
    from mods.config import SampleConfig
    from mods.core.engine import execute
    from mods.stages.data import IngestParams
    from mods.stages.quality import ScoringParams

    started = time.perf_counter()
    ingest = execute(workspace, "ingest", IngestParams(sources=[str(pool)]), {}, progress=False).artifact
    sample = execute(workspace, "sample", SampleConfig(rows=None, max_chars=None), {"ingest": ingest},
                     progress=False).artifact
    quality = execute(workspace, "quality", ScoringParams(), {"sample": sample}, progress=False,
                      rows_per_shard=rows_per_shard)
    return time.perf_counter() - started, {**quality.summary, "folder": str(quality.artifact.dir(workspace))}


def rows_done(workspace: Path) -> int:
    """Rows in the quality row store's finished parts (each part is written atomically)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows
               for p in (workspace / "rowstore" / "quality").glob("*/part-*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--rows-per-shard", type=int, default=16)
    parser.add_argument("--child", nargs=2, metavar=("WORKSPACE", "POOL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        score_pool(Path(args.child[0]), Path(args.child[1]), args.rows_per_shard)
        return

    with tempfile.TemporaryDirectory(prefix="mods-incremental-") as tmp:
        folder = Path(tmp)
        base, grown = write_pools(folder, args.rows)
        from mods.models.loading import prepare_smollm2

        prepare_smollm2(progress=False)
        # Untimed warm-up on other rows: the first forward passes of a process are slow.
        (folder / "warmup").mkdir()
        score_pool(folder / "warmup", write_pools(folder / "warmup", 16)[0], args.rows_per_shard)

        full_s, full = score_pool(folder / "ws", base, args.rows_per_shard)
        grown_s, grown_summary = score_pool(folder / "ws", grown, args.rows_per_shard)
        print(f"full run:   {full['rows']} rows scored in {full_s:.1f} s ({full['rows'] / full_s:.1f} rows/s)")
        print(f"grown pool: {grown_summary['rows_computed']} new rows scored, {grown_summary['rows_reused']} reused, "
              f"in {grown_s:.1f} s")

        # Killed once about half the rows are stored (a shard holds whole batches, so it may
        # hold more rows than --rows-per-shard: count rows, not shards).
        resumed_ws = folder / "resumed"
        child = subprocess.Popen([sys.executable, __file__, "--rows-per-shard", str(args.rows_per_shard),
                                  "--child", str(resumed_ws), str(base)], start_new_session=True)
        while rows_done(resumed_ws) < full["rows"] // 2 and child.poll() is None:
            time.sleep(0.1)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        killed_at = rows_done(resumed_ws)
        if killed_at >= full["rows"]:
            sys.exit(f"the child finished all {full['rows']} rows before the kill: use more --rows")
        resume_s, resumed = score_pool(resumed_ws, base, args.rows_per_shard)
        print(f"resume:     killed with {killed_at}/{full['rows']} rows stored; {resumed['rows_computed']} rows "
              f"scored after the kill in {resume_s:.1f} s")
        identical = (Path(resumed["folder"]) / "scores.parquet").read_bytes() == \
            (Path(full["folder"]) / "scores.parquet").read_bytes()
        print(f"incremental_ratio={grown_s / full_s:.3f} resume_ratio={resume_s / full_s:.3f} "
              f"rows_recomputed={grown_summary['rows_computed']} identical={str(identical).lower()}")


if __name__ == "__main__":
    main()
