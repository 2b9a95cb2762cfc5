"""What early cut-off saves: a grown pool whose seed set comes out the same.

Keys follow the content a stage reads (mods/core/engine.py): the training stages key on
the texts of the rows they train on, so a grown pool that selects the same seed set keeps
the seed model, and the old rows' answers (keyed by the seed model) come from the row store.

1. cold:    the whole pipeline (engine, no Prefect) on real ShareGPT rows with the packaged
            models, in a fresh workspace;
2. grown:   the pool plus 4 rows that ask what 4 pool rows ask, with other answers (they embed
            as those rows do, so the seed set stays the same), rerun in that workspace;
3. without: the same grown rerun in a copy of the cold workspace with the training stages'
            read digest switched off, so they key on their whole inputs as before early
            cut-off (the grown pool retrains the seed model and answers every row again).

Last line:
    grown_s=X without_s=Y ratio=X/Y cold_s=Z seed_train_reused=true|false answers_computed=N

    .venv/bin/python benchmarks/early_cutoff.py [--rows 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_pools(folder: Path, rows: int) -> tuple[Path, Path]:
    """Real ShareGPT rows, and the same rows plus 4 that repeat the instructions of the first 4."""
    from mods.data.ingest import IngestConfig, ingest
    from mods.data.readers import demo_sources

    pool = ingest(demo_sources(), IngestConfig(), progress=False).rows
    size = pool["instruction"].str.len() + pool["input"].str.len() + pool["output"].str.len()
    records = pool[size <= 600].sample(n=rows, random_state=0)[["instruction", "input", "output"]].to_dict("records")
    again = [{**row, "output": f"Another answer, number {i}."} for i, row in enumerate(records[:4])]
    base, grown = folder / "base.jsonl", folder / "grown.jsonl"
    base.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    grown.write_text(base.read_text() + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in again))
    return base, grown


def config(pool: Path, workspace: Path, rows: int):
    from mods.config import PipelineConfig
    from mods.selection.kcenter import first_center

    # The first k-center pick is a seeded index into the rows: a seed whose first pick is the
    # same row for the base and the grown pool (all rows kept: keep_fraction 1).
    seed = next(s for s in range(1000) if first_center(rows, s) == first_center(rows + 4, s))
    train = {"epochs": 1, "max_length": 256}
    return PipelineConfig.model_validate({
        "data": [str(pool)], "workspace": str(workspace),
        "sample": {"rows": None, "max_chars": None},
        "quality": {"keep_fraction": 1.0},
        "seed_selection": {"k": 4, "seed": seed},
        "seed_training": train, "final_training": train,
        "necessity": {"k": 4, "generation": {"max_new_tokens": 16}},
        "execution": {"progress": False},
    })


def run_pipeline(cfg) -> tuple[float, dict[str, dict]]:
    """Every stage through the engine in this process: seconds, and per stage whether it
    executed and its row counts."""
    from mods.core.engine import Engine
    from mods.core.stage import get_stage
    from mods.pipeline import PIPELINE, stage_params

    engine = Engine(cfg.workspace, progress=False)
    params = stage_params(cfg, list(cfg.data))
    artifacts: dict = {}
    done: dict[str, dict] = {}
    started = time.perf_counter()
    for name in PIPELINE:
        run = engine.resolve(name, params[name], {i: artifacts[i] for i in get_stage(name).inputs})
        outcome = engine.run(run)
        artifacts[name] = outcome.artifact
        done[name] = {"executed": outcome.executed, "rows_computed": outcome.summary.get("rows_computed")}
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args()

    from mods.stages.training import TrainingStage

    with tempfile.TemporaryDirectory(prefix="mods-cutoff-") as tmp:
        folder = Path(tmp)
        base, grown = write_pools(folder, args.rows)
        cold_s, _ = run_pipeline(config(base, folder / "ws", args.rows))
        print(f"cold: {cold_s:.1f} s (every stage executed)")
        shutil.copytree(folder / "ws", folder / "ws-without")

        grown_s, with_cutoff = run_pipeline(config(grown, folder / "ws", args.rows))
        executed = [name for name, info in with_cutoff.items() if info["executed"]]
        print(f"grown, early cut-off: {grown_s:.1f} s; executed {executed}; "
              f"answers computed {with_cutoff['answers']['rows_computed']}")

        TrainingStage.input_digest = lambda self, params, inputs: None  # keys on whole inputs, as before
        without_s, without = run_pipeline(config(grown, folder / "ws-without", args.rows))
        executed = [name for name, info in without.items() if info["executed"]]
        print(f"grown, without early cut-off: {without_s:.1f} s; executed {executed}; "
              f"answers computed {without['answers']['rows_computed']}")

    print(f"grown_s={grown_s:.1f} without_s={without_s:.1f} ratio={grown_s / without_s:.3f} cold_s={cold_s:.1f} "
          f"seed_train_reused={str(not with_cutoff['seed_train']['executed']).lower()} "
          f"answers_computed={with_cutoff['answers']['rows_computed']}")


if __name__ == "__main__":
    main()
