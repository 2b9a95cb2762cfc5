"""Per-stage subcommands on plain files, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.cli import main
from mods.models.embedding import embeddings_table

ROWS = [
    {"instruction": "Name a fruit.", "input": "", "output": "Apple."},
    {"instruction": "Add numbers.", "input": "2 and 2", "output": "Four."},
    {"instruction": "Greet someone.", "input": "", "output": "Hello there!"},
    {"instruction": "Say a colour.", "input": "", "output": "Green."},
]


@pytest.fixture()
def rows_file(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_bad_override_is_one_line(capsys):
    assert main(["run", "--set", "nonsense"]) == 2
    assert "expected section.field=value" in one_line_error(capsys)


def test_invalid_config_value_is_one_line(capsys):
    assert main(["run", "--set", "seed_selection.k=-3"]) == 2
    assert "seed_selection.k" in one_line_error(capsys)


def test_unknown_config_field_is_one_line(capsys, tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text("quality:\n  alpah: 0\n")
    assert main(["run", "--config", str(config)]) == 2
    assert "alpah" in one_line_error(capsys)


def test_the_demos_sample_applies_to_the_demo_pool_and_your_data_is_used_whole():
    from mods.config import load_config

    demo = load_config(None, {})
    assert (demo.sample.rows, demo.sample.max_chars) == (160, 1000)  # make run: the demo's keys
    assert demo.sample_rule() == ("data: the demo pool, a seeded sample of 160 rows, drawn from those of at most 1,000 "
                                  "characters (the CPU demo's defaults: sample.rows, sample.max_chars)")
    own = load_config(None, {"data": ["my.jsonl"]})
    assert (own.sample.rows, own.sample.max_chars) == (None, None)
    assert own.sample_rule() == "data: 1 source, every row (sample.rows and sample.max_chars are empty)"
    # What the configuration samples is kept, and said.
    capped = load_config(None, {"data": ["a.jsonl", "b.jsonl"], "sample": {"rows": 500}})
    assert (capped.sample.rows, capped.sample.max_chars) == (500, None)
    assert capped.sample_rule() == "data: 2 sources, a seeded sample of 500 rows (as configured: sample.rows, sample.max_chars)"
    # A round trip (the Prefect UI form, a worker) keeps the decision.
    assert load_config(None, own.model_dump()).sample.rows is None


def test_plan_on_an_empty_workspace_says_every_stage_is_to_run(tmp_path: Path, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["plan", "--data", str(pool), "--workspace", str(tmp_path / "ws"), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "data: 1 source, every row (sample.rows and sample.max_chars are empty)"
    stages = {line.split()[0]: " ".join(line.split()[1:]) for line in out[2:]}
    assert list(stages)[:3] == ["ingest", "sample", "quality"] and len(stages) == 13
    assert stages["ingest"] == "to run" and stages["sample"] == "to run, after ingest"
    assert stages["final_train"] == "to run, after high_quality, seed_select, augment_select"
    assert not (tmp_path / "ws" / "artifacts" / "ingest").exists()


def test_until_names_a_stage_or_is_one_line(tmp_path: Path, capsys):
    assert main(["run", "--until", "qualty", "--workspace", str(tmp_path / "ws"), "--quiet"]) == 2
    assert "--until qualty: not a stage of the pipeline (ingest, sample, quality" in one_line_error(capsys)


def test_select_writes_pick_order_and_honours_already_selected(tmp_path: Path, capsys):
    ids = [f"r{i}" for i in range(6)]
    vectors = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [5, 5], [1, 0]], dtype=np.float32)
    import pyarrow.parquet as pq

    pq.write_table(embeddings_table(ids, vectors), tmp_path / "emb.parquet")
    pd.DataFrame({"id": ["r4"]}).to_parquet(tmp_path / "chosen.parquet")
    assert main(["select", str(tmp_path / "emb.parquet"), "--k", "4", "--out", str(tmp_path / "sel.parquet"),
                 "--already-selected", str(tmp_path / "chosen.parquet")]) == 0
    picked = pd.read_parquet(tmp_path / "sel.parquet")
    assert picked["pick_order"].tolist() == [0, 1, 2, 3]
    assert "r4" not in picked["id"].tolist()
    assert set(picked["id"]) == {"r0", "r1", "r2", "r3"}  # the four corners, farthest from the centre
    assert (np.diff(picked["radius_after"]) <= 1e-6).all()


def test_select_takes_the_seed_selections_parameters_and_its_coverage_methods(tmp_path: Path, capsys):
    """`mods select` is the seed_select stage's selection: its flags come from the stage's
    parameter models, and a coverage method other than k-center picks what the stage's path picks."""
    import pyarrow.parquet as pq

    from mods.selection.coverage_methods import CoverageConfig, budgeted_selection

    rng = np.random.default_rng(0)
    ids = [f"r{i}" for i in range(40)]
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    pq.write_table(embeddings_table(ids, vectors), tmp_path / "emb.parquet")
    rows = pd.DataFrame({"id": ids, "instruction": [f"task {i}" for i in range(40)], "input": "", "output": "ok",
                         "source": "pool.jsonl", "quality_score": rng.normal(size=40)})
    rows.to_parquet(tmp_path / "rows.parquet")
    out = tmp_path / "picked.parquet"
    args = ["select", str(tmp_path / "emb.parquet"), "--k", "5", "--method", "kmeans_quality", "--clusters", "3",
            "--out", str(out)]
    assert main(args) == 2
    assert "--rows" in one_line_error(capsys)
    assert main([*args, "--rows", str(tmp_path / "rows.parquet")]) == 0
    expected, _ = budgeted_selection(CoverageConfig(method="kmeans_quality", clusters=3), vectors, rows, 5, None, {},
                                     {}, None)
    assert pd.read_parquet(out)["id"].tolist() == expected["id"].tolist() and len(expected) == 5
    assert main(["select", str(tmp_path / "emb.parquet"), "--k", "0", "--out", str(out)]) == 2
    assert "select: k:" in one_line_error(capsys)  # the stage's own bounds (k >= 1)


def test_select_errors_are_one_line(tmp_path: Path, capsys):
    assert main(["select", str(tmp_path / "missing.parquet"), "--k", "2", "--out", str(tmp_path / "x.parquet")]) == 2
    assert "no such file" in one_line_error(capsys)
    import pyarrow.parquet as pq

    pq.write_table(embeddings_table(["a", "b"], np.eye(2, dtype=np.float32)), tmp_path / "emb.parquet")
    assert main(["select", str(tmp_path / "emb.parquet"), "--k", "5", "--out", str(tmp_path / "x.parquet")]) == 2
    one_line_error(capsys)


def test_score_with_a_local_reward_model(rows_file: Path, tmp_path: Path):
    from tiny_models import make_tiny_reward_model

    model = make_tiny_reward_model(tmp_path / "rm")
    out = tmp_path / "scored.parquet"
    assert main(["score", str(rows_file), "--scorer", "reward-model", "--model", str(model), "--out", str(out), "--quiet"]) == 0
    scored = pd.read_parquet(out)
    assert len(scored) == len(ROWS) and np.isfinite(scored["quality_score"]).all()
    assert scored["instruction"].tolist() == [r["instruction"] for r in ROWS]


def test_reward_model_scorer_needs_a_folder(rows_file: Path, tmp_path: Path, capsys):
    code = main(["score", str(rows_file), "--scorer", "reward-model", "--model", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "s.parquet"), "--quiet"])
    assert code == 2
    one_line_error(capsys)


def test_train_then_necessity_on_files(rows_file: Path, tmp_path: Path, tiny_llama_dir: Path):
    model_dir = tmp_path / "model"
    assert main(["train", str(rows_file), "--base-model", str(tiny_llama_dir), "--out", str(model_dir),
                 "--epochs", "1", "--max-length", "48", "--device", "cpu", "--quiet"]) == 0
    assert (model_dir / "adapter_model.safetensors").is_file()
    out = tmp_path / "necessity.parquet"
    assert main(["necessity", str(rows_file), "--model-dir", str(model_dir), "--model", str(tiny_llama_dir),
                 "--max-new-tokens", "4", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    frame = pd.read_parquet(out)
    assert len(frame) == len(ROWS)
    assert {"seed_answer", "necessity_score"} <= set(frame.columns)


def test_train_and_prepare_models_take_a_hub_id(rows_file: Path, tmp_path: Path, tiny_llama_dir: Path,
                                                monkeypatch, capsys):
    """A hub id where a model is named, read from the Hugging Face cache (offline here)."""
    import huggingface_hub.constants as hub
    from tiny_models import make_hub_cache

    from mods.training.process import TRAINED_MODEL_META

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = make_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_llama_dir, "c" * 40)
    model_dir = tmp_path / "model"
    assert main(["train", str(rows_file), "--base-model", "tiny-org/tiny-llama", "--out", str(model_dir),
                 "--epochs", "1", "--max-length", "48", "--device", "cpu", "--quiet"]) == 0
    assert json.loads((model_dir / TRAINED_MODEL_META).read_text())["base_model"] == "tiny-org/tiny-llama"
    config = tmp_path / "hub-model.yaml"
    config.write_text("base_model: tiny-org/tiny-llama\n")
    capsys.readouterr()
    assert main(["prepare-models", "--config", str(config)]) == 0
    assert f"base_model = tiny-org/tiny-llama: {snapshot}" in capsys.readouterr().out
    assert main(["prepare-models", "--set", "base_model=tiny-org/missing"]) == 2
    line = one_line_error(capsys)
    assert "base_model: 'tiny-org/missing' is not a local folder" in line and "HF_HUB_OFFLINE=1" in line


def test_ifd_on_files_gives_the_ifd_of_each_row(rows_file: Path, tmp_path: Path, tiny_llama_dir: Path, capsys):
    from mods.models.loading import load_causal_lm
    from mods.scoring.ifd import ifd_scores

    out = tmp_path / "ifd.parquet"
    assert main(["ifd", str(rows_file), "--model-dir", str(tiny_llama_dir), "--out", str(out), "--max-length", "64",
                 "--device", "cpu", "--quiet"]) == 0
    frame = pd.read_parquet(out)
    assert frame["instruction"].tolist() == [r["instruction"] for r in ROWS] and (frame["ifd"] > 0).all()
    model, tokenizer = load_causal_lm(tiny_llama_dir, device="cpu")
    expected = ifd_scores(model, tokenizer, frame[["id", "instruction", "input", "output"]], 64)
    assert np.allclose(frame["ifd"], expected["ifd"], rtol=1e-4)
    capsys.readouterr()
    assert main(["ifd", str(rows_file), "--model-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "--model-dir" in one_line_error(capsys)


def test_embed_writes_one_vector_per_row(rows_file: Path, tmp_path: Path):
    from mods.models.embedding import read_embeddings

    out = tmp_path / "emb.parquet"
    assert main(["embed", str(rows_file), "--out", str(out), "--quiet"]) == 0
    ids, vectors = read_embeddings(out)
    assert len(ids) == len(ROWS) and vectors.shape == (len(ROWS), 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_score_gives_one_score_per_input_row_and_says_what_it_left_out(tmp_path: Path, tiny_llama_dir: Path, capsys):
    rows = ROWS + [ROWS[0], ROWS[2], ROWS[0]]  # three exact duplicates
    path = tmp_path / "dups.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    out = tmp_path / "scored.parquet"
    assert main(["score", str(path), "--model", str(tiny_llama_dir), "--device", "cpu", "--out", str(out),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "1 input rows left out (1 json_syntax)" in err and "3 duplicate input rows" in err
    scored = pd.read_parquet(out)
    assert scored["instruction"].tolist() == [r["instruction"] for r in rows]  # input order, every row
    assert scored["source_line"].tolist() == list(range(1, len(rows) + 1))
    first, copy = scored.iloc[0], scored.iloc[len(ROWS)]
    assert first["quality_score"] == copy["quality_score"]


def test_score_of_a_missing_file_is_one_line(tmp_path: Path, capsys):
    assert main(["score", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.parquet"), "--quiet"]) == 2
    assert "missing.jsonl" in one_line_error(capsys)


def test_necessity_without_a_model_folder_is_one_line(rows_file: Path, tmp_path: Path, capsys):
    assert main(["necessity", str(rows_file), "--model-dir", str(tmp_path / "none"), "--out",
                 str(tmp_path / "o.parquet"), "--quiet"]) == 2
    assert "--model-dir" in one_line_error(capsys)


def test_train_out_of_memory_retries_with_a_smaller_batch_like_the_stage(rows_file: Path, tmp_path: Path,
                                                                        tiny_llama_dir: Path, monkeypatch, caplog):
    """`mods train` shares the training stages' out-of-memory retry: the batch shrinks, the
    global batch stays, the model is written and no checkpoint folder is left."""
    import torch

    import mods.training.train

    real_train = mods.training.train.train_model
    batch_sizes = []

    def train_that_fits_two_rows(base_model, rows, config, out_dir, progress=True, checkpoint_dir=None):
        batch_sizes.append((config.batch_size, config.global_batch))
        if config.batch_size > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real_train(base_model, rows, config, out_dir, progress=progress, checkpoint_dir=checkpoint_dir)

    monkeypatch.setattr(mods.training.train, "train_model", train_that_fits_two_rows)
    model_dir = tmp_path / "model"
    with caplog.at_level("WARNING"):
        assert main(["train", str(rows_file), "--base-model", str(tiny_llama_dir), "--out", str(model_dir),
                     "--epochs", "1", "--max-length", "48", "--batch-size", "8", "--global-batch", "8",
                     "--device", "cpu", "--quiet"]) == 0
    assert batch_sizes == [(8, 8), (4, 8), (2, 8)]
    assert "retrying with batch_size=4" in caplog.text and "retrying with batch_size=2" in caplog.text
    assert (model_dir / "adapter_model.safetensors").is_file()
    assert not (tmp_path / ".model.checkpoints").exists()


def test_train_global_batch_not_a_multiple_of_the_batch_is_one_line(rows_file: Path, tmp_path: Path, capsys):
    assert main(["train", str(rows_file), "--out", str(tmp_path / "m"), "--batch-size", "16", "--device", "cpu",
                 "--quiet"]) == 2
    message = one_line_error(capsys)
    assert "global_batch=8 is not a multiple of batch_size=16" in message
    assert not (tmp_path / "m").exists() and not (tmp_path / ".m.checkpoints").exists()


def test_score_and_embed_commands_give_the_pipeline_stages_values(rows_file: Path, tmp_path: Path,
                                                                  tiny_llama_dir: Path):
    """One stage definition: `mods score` / `mods embed` on a file and the quality / embed
    stages on the same rows write the same numbers (they call the same stage functions)."""
    from mods.core.engine import execute

    out = tmp_path / "scored.parquet"
    assert main(["score", str(rows_file), "--scorer", "likelihood", "--model", str(tiny_llama_dir), "--device", "cpu",
                 "--max-length", "64", "--out", str(out), "--quiet"]) == 0
    vectors_out = tmp_path / "vectors.parquet"
    assert main(["embed", str(rows_file), "--device", "cpu", "--out", str(vectors_out), "--quiet"]) == 0

    ws = tmp_path / "ws"
    ingested = execute(ws, "ingest", {"sources": [str(rows_file)]}, {}, progress=False).artifact
    sampled = execute(ws, "sample", {"rows": None, "max_chars": None}, {"ingest": ingested}, progress=False).artifact
    scorer = {"kind": "likelihood", "model": str(tiny_llama_dir), "device": "cpu", "max_length": 64}
    quality = execute(ws, "quality", {"scorer": scorer}, {"sample": sampled}, progress=False).artifact
    staged = pd.read_parquet(quality.dir(ws) / "scores.parquet").set_index("id")["quality_score"]
    scored = pd.read_parquet(out).set_index("id")["quality_score"]
    assert len(scored) == len(ROWS) and scored.sort_index().equals(staged.loc[scored.index].sort_index())

    kept = execute(ws, "high_quality", {"alpha": None, "keep_fraction": 1.0},
                   {"sample": sampled, "quality": quality}, progress=False).artifact
    embedded = execute(ws, "embed", {"device": "cpu"}, {"high_quality": kept}, progress=False).artifact
    stage_vectors = pd.read_parquet(embedded.dir(ws) / "embeddings.parquet").set_index("id")["embedding"]
    cli_vectors = pd.read_parquet(vectors_out).set_index("id")["embedding"]
    assert set(cli_vectors.index) == set(stage_vectors.index)
    for row_id in cli_vectors.index:
        assert np.array_equal(np.asarray(cli_vectors[row_id]), np.asarray(stage_vectors[row_id]))


def test_a_hub_id_reaches_the_hub_reader_and_fails_in_one_line(tmp_path: Path, capsys, monkeypatch):
    """`--data org/name` stays a hub id (only existing paths are made absolute), so the
    readers' hub branch answers in one line: without `datasets`, that it is needed; with
    it and no hub (offline, as here), that the hub cannot be reached."""
    from flows.mods_pipeline import resolve_sources

    existing = tmp_path / "pool.jsonl"
    existing.write_text("{}\n")
    assert resolve_sources(["tatsu-lab/alpaca", str(existing)]) == ["tatsu-lab/alpaca", str(existing.resolve())]
    try:
        import datasets  # noqa: F401
    except ImportError:
        datasets = None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network either way: the answer must not wait for one
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["run", "--data", "tatsu-lab/alpaca", "--workspace", str(tmp_path / "ws"), "--quiet"]) == 2
    line = one_line_error(capsys)
    assert "tatsu-lab/alpaca" in line
    if datasets is None:
        assert "Hugging Face hub id" in line and "`datasets`" in line
    else:
        assert "cannot load from the Hugging Face hub" in line


def test_every_flag_comes_from_its_parameter_model():
    """One definition per parameter: the per-stage commands' flags are the models' fields,
    with their types, choices, defaults and descriptions; a flag two models share sets both."""
    import argparse

    from flows.cli import build_parser
    from flows.cli_flags import from_flags
    from mods.generation.config import GenerationConfig
    from mods.scoring.config import ScorerConfig
    from mods.models.embedding import EmbeddingConfig
    from mods.training.config import TrainConfig

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    def options(command: str) -> dict[str, argparse.Action]:
        return {flag: action for action in commands[command]._actions for flag in action.option_strings}

    for command, model, rename in (("train", TrainConfig, {}), ("embed", EmbeddingConfig, {}),
                                   ("score", ScorerConfig, {"kind": "scorer"}),
                                   ("necessity", GenerationConfig, {"batch_size": "gen_batch_size"})):
        flags = options(command)
        for name, field in model.model_fields.items():
            flag = "--" + rename.get(name, name).replace("_", "-")
            assert flag in flags, (command, flag)
            assert (field.description or "")[:40].replace("%", "%%") in flags[flag].help, (command, flag)
    assert options("train")["--method"].choices == ["lora", "full"]
    assert options("score")["--scorer"].choices == ["preference", "likelihood", "reward-model"]

    args = parser.parse_args(["necessity", "d.jsonl", "--model-dir", "m", "--out", "o.parquet", "--device", "cpu",
                              "--gen-batch-size", "3", "--batch-size", "5", "--scorer", "likelihood"])
    generation, scorer = from_flags(args, GenerationConfig, "g"), from_flags(args, ScorerConfig, "s")
    assert (generation.device, generation.batch_size) == ("cpu", 3)
    assert (scorer.device, scorer.batch_size, scorer.kind) == ("cpu", 5, "likelihood")
    assert from_flags(parser.parse_args(["train", "d", "--out", "o"]), TrainConfig, "t") == TrainConfig()
