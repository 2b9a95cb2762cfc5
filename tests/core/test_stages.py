import numpy as np

from mods.selection.thresholds import pickable_rows


def test_pickable_rows_counts_distinct_non_center_vectors():
    m = np.array([[0, 0], [0, 0], [1, 0], [1, 0], [2, 2]], dtype=np.float32)
    assert pickable_rows(m, []) == 3
    assert pickable_rows(m, [0]) == 2          # [0,0] is a center: its duplicate cannot be picked
    assert pickable_rows(m, [0, 4]) == 1
    assert pickable_rows(m[:0], []) == 0


def test_distinct_candidates_match_the_row_by_row_rule_on_random_duplicates():
    """The vectorised mask equals the rule it replaced: walk the rows in order, skip centers and
    anything seen (centers seed what is seen), keep the first of each vector."""
    from mods.selection.thresholds import distinct_candidates

    def by_rows(matrix, already):
        taken = set(already)
        seen = {matrix[i].tobytes() for i in taken}
        mask = np.zeros(len(matrix), dtype=bool)
        for i, row in enumerate(matrix):
            if i not in taken and row.tobytes() not in seen:
                seen.add(row.tobytes())
                mask[i] = True
        return mask

    rng = np.random.default_rng(0)
    for trial in range(50):
        distinct = rng.normal(size=(int(rng.integers(1, 12)), 3)).astype(np.float32)
        matrix = distinct[rng.integers(0, len(distinct), size=int(rng.integers(1, 40)))]
        already = sorted(set(rng.integers(0, len(matrix), size=int(rng.integers(0, 4))).tolist()))
        assert (distinct_candidates(matrix, already) == by_rows(matrix, already)).all(), trial
        assert pickable_rows(matrix, already) == by_rows(matrix, already).sum()


def test_out_of_memory_block_is_split_until_it_fits():
    import pandas as pd
    import torch

    from mods.core.engine import compute_block
    from mods.core.stage import RowwiseStage

    seen: list[int] = []

    class Doubling(RowwiseStage):
        name = "demo"

        def process_batch(self, state, block, params):
            seen.append(len(block))
            if len(block) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return pd.DataFrame({"double": block["x"] * 2})

    block = pd.DataFrame({"x": range(8)})
    result = compute_block(Doubling(), None, block, None)
    assert result["double"].tolist() == [2 * x for x in range(8)]
    assert seen[0] == 8 and max(seen[1:]) <= 4 and sum(n for n in seen if n <= 2) == 8


def test_a_deterministic_error_is_not_split_or_retried():
    import pandas as pd
    import pytest
    from prefect.states import Failed

    from mods.core.engine import compute_block
    from mods.core.stage import RowwiseStage
    from tasks import retry_if_transient

    calls = []

    class Failing(RowwiseStage):
        name = "demo"

        def process_batch(self, state, block, params):
            calls.append(len(block))
            raise ValueError("bad row")

    with pytest.raises(ValueError):
        compute_block(Failing(), None, pd.DataFrame({"x": range(8)}), None)
    assert calls == [8]
    import torch

    assert not retry_if_transient(None, None, Failed(data=ValueError("bad row")))
    assert retry_if_transient(None, None, Failed(data=torch.OutOfMemoryError("simulated")))
    assert retry_if_transient(None, None, Failed(data=TimeoutError("nfs")))


def _fake_training_inputs(tmp_path):
    import pandas as pd

    from mods.core.artifacts import Workspace
    from mods.core.stage import StageContext

    pd.DataFrame({"id": ["a"], "instruction": ["i"], "input": [""], "output": ["o"]}).to_parquet(tmp_path / "rows.parquet")
    pd.DataFrame({"id": ["a"]}).to_parquet(tmp_path / "selected.parquet")
    return StageContext(out=tmp_path, inputs={"high_quality": tmp_path, "seed_select": tmp_path}, scratch=tmp_path / "s",
                        workspace=Workspace(tmp_path))


def test_training_out_of_memory_retries_with_half_the_batch_and_the_same_global_batch(tmp_path, monkeypatch):
    import pytest
    import torch

    import mods.training.train
    from mods.stages.training import SeedTrain, TrainingParams
    from mods.training.config import TrainConfig

    def _train(ctx, params, selections):
        return SeedTrain().run(ctx, params)

    tried = []
    fits = 2

    def fake_train(base_model, rows, config, out_dir, progress=True, checkpoint_dir=None):
        tried.append((config.batch_size, config.global_batch, checkpoint_dir.name))
        if config.batch_size > fits:
            raise torch.OutOfMemoryError("simulated")
        return {"ok": True}

    monkeypatch.setattr(mods.training.train, "train_model", fake_train)
    ctx = _fake_training_inputs(tmp_path)
    params = TrainingParams(base_model="x", train=TrainConfig(batch_size=8, global_batch=8))
    assert _train(ctx, params, ["seed_select"]) == {"ok": True}
    # each retry has its own checkpoints (another batch size is another run)
    assert tried == [(8, 8, "checkpoints-b8"), (4, 8, "checkpoints-b4"), (2, 8, "checkpoints-b2")]

    # half the batch need not divide the global batch: the largest divisor below half is taken,
    # down to 1 row; out of memory at 1 row is the error itself
    tried.clear()
    fits = 0
    params = TrainingParams(base_model="x", train=TrainConfig(batch_size=12, global_batch=36))
    with pytest.raises(torch.OutOfMemoryError):
        _train(ctx, params, ["seed_select"])
    assert [(size, total) for size, total, _ in tried] == [(12, 36), (6, 36), (3, 36), (1, 36)]
    tried.clear()
    params = TrainingParams(base_model="x", train=TrainConfig(batch_size=10, global_batch=30))
    with pytest.raises(torch.OutOfMemoryError):
        _train(ctx, params, ["seed_select"])
    assert [size for size, _, _ in tried] == [10, 5, 2, 1]  # 30's divisors: 5 ≤ 10/2, 2 ≤ 5/2, 1


def _training_inputs(workspace):
    import pandas as pd
    from stage_helpers import table_artifact

    rows = pd.DataFrame({"id": ["a", "b"], "instruction": ["i", "j"], "input": ["", ""], "output": ["o", "p"]})
    return {"high_quality": table_artifact(workspace, "high_quality", {"rows.parquet": rows}),
            "seed_select": table_artifact(workspace, "seed_select", {"selected.parquet": rows[["id"]].iloc[:1]}),
            "augment_select": table_artifact(workspace, "augment_select", {"selected.parquet": rows[["id"]].iloc[1:]})}


def test_the_process_count_is_not_in_the_training_key_the_global_batch_is(tmp_path):
    from mods.core.engine import Engine
    from mods.stages.training import TrainingParams
    from mods.training.config import TrainConfig

    engine = Engine(tmp_path)
    final = _training_inputs(tmp_path)
    inputs = {name: final[name] for name in ("high_quality", "seed_select")}

    def key(**train) -> str:
        return engine.resolve("seed_train", TrainingParams(base_model="x", train=TrainConfig(**train)), inputs).key

    # an 8-GPU worker and a 1-GPU worker compute the same update: one artifact
    assert key(processes=None) == key(processes=1) == key(processes=8) == key(processes=3, batch_size=8)
    assert key(global_batch=16) != key(global_batch=8)
    assert key(batch_size=4, global_batch=8) != key(batch_size=8, global_batch=8)  # other micro-batches
    assert engine.resolve("final_train", TrainingParams(base_model="x", train=TrainConfig(processes=2)), final).key == \
        engine.resolve("final_train", TrainingParams(base_model="x", train=TrainConfig(processes=4)), final).key


def test_a_training_stage_removes_its_checkpoints_once_the_artifact_is_complete(tmp_path, tiny_llama_dir, monkeypatch):
    import pandas as pd
    from stage_helpers import run_body

    import mods.training.process
    from mods.core.artifacts import Workspace, artifact_problem
    from mods.core.engine import execute
    from mods.stages.training import TrainingParams
    from mods.training.config import TrainConfig

    workspace = Workspace(tmp_path / "ws")
    rows = pd.DataFrame({"id": [f"r{i}" for i in range(4)], "instruction": ["Say hi.", "Add 1 and 2.", "A colour?", "Count."],
                         "input": [""] * 4, "output": ["Hi!", "Three.", "Red.", "One, two."]})

    def write(name: str, filename: str, frame: pd.DataFrame):
        def body(ctx):
            frame.to_parquet(ctx.out / filename, index=False)
        return run_body(workspace, name, {"test": name}, {}, body).artifact

    inputs = {"high_quality": write("high_quality", "rows.parquet", rows),
              "seed_select": write("seed_select", "selected.parquet", rows[["id"]])}
    saved = []
    real_save = mods.training.process._save_checkpoint

    def recording_save(accelerator, model, job, step, records, sharded):
        real_save(accelerator, model, job, step, records, sharded)
        saved.append(sorted(p.name for p in job.checkpoint_dir.iterdir()))

    monkeypatch.setattr(mods.training.process, "_save_checkpoint", recording_save)
    config = TrainConfig(epochs=2, batch_size=2, global_batch=2, max_length=48, device="cpu", checkpoint_every=1,
                         processes=1)
    outcome = execute(workspace, "seed_train", TrainingParams(base_model=str(tiny_llama_dir), train=config), inputs,
                      progress=False)
    assert outcome.executed and outcome.summary["optimizer_steps"] == 4
    assert saved == [["step-00000001"], ["step-00000002"], ["step-00000003"]]  # checkpoints were in the scratch
    assert artifact_problem(outcome.artifact.dir(workspace), False) is None
    scratch = workspace.scratch_dir("seed_train", outcome.artifact.key)
    assert not scratch.exists()
    leftovers = [p.name for p in outcome.artifact.dir(workspace).parent.iterdir() if "scratch" in p.name or "tmp" in p.name]
    assert leftovers == []


def test_a_server_away_is_transient_a_bad_value_is_not():
    import httpx

    from mods.core.faults import is_transient

    class ConcurrencySlotAcquisitionError(Exception):  # Prefect's, by name
        pass

    try:
        try:
            raise httpx.ConnectError("connection refused")
        except httpx.ConnectError as cause:
            raise ConcurrencySlotAcquisitionError("could not acquire a slot") from cause
    except ConcurrencySlotAcquisitionError as error:
        assert is_transient(error)
    try:
        try:
            raise httpx.ConnectError("refused")
        except httpx.ConnectError:
            raise RuntimeError("wrapped without 'from'")
    except RuntimeError as error:
        assert is_transient(error)
    assert not is_transient(ValueError("no row passed the quality filter"))
    assert not is_transient(KeyError("seed_answer"))


def test_a_new_scorer_version_never_reuses_old_scores(tmp_path, monkeypatch):
    """quality and necessity keys, and their row stores, follow SCORER_VERSION; it carries
    the shipped preference head's digest, so a refit head is a new version by itself."""
    import pandas as pd
    from stage_helpers import table_artifact

    import mods.scoring.scorers as scoring
    from mods.core.engine import Engine

    engine = Engine(tmp_path)
    params = {"scorer": {"kind": "likelihood", "model": str(tmp_path / "no-model"), "device": "cpu"}}
    rows = pd.DataFrame({"id": ["a"], "instruction": ["i"], "input": [""], "output": ["o"], "seed_answer": ["s"]})
    inputs = {"sample": table_artifact(tmp_path, "sample", {"rows.parquet": rows})}
    answers = {"answers": table_artifact(tmp_path, "answers", {"answers.parquet": rows})}

    def resolved():
        quality = engine.resolve("quality", params, inputs)
        return quality.key, quality.fingerprint, engine.resolve("necessity", params, answers).key

    before = resolved()
    monkeypatch.setattr(scoring, "SCORER_VERSION", scoring.SCORER_VERSION + "-next")
    after = resolved()
    assert before[0] != after[0] and before[1] != after[1]
    assert before[2] != after[2]
    assert scoring._file_digest(scoring.PREFERENCE_HEAD_FILE) in scoring.SCORER_VERSION


def test_the_architecture_docs_example_stage_runs(tmp_path, monkeypatch):
    """The stage shown in docs/architecture.md, run as written: one class and the pipeline's list."""
    import json
    import re
    from pathlib import Path
    from typing import Any

    import pandas as pd
    import pytest
    from pydantic import Field, ValidationError
    from stage_helpers import table_artifact

    import mods.pipeline
    from mods.config import PipelineConfig
    from mods.core.engine import execute
    from mods.core.faults import MissingOutputError
    from mods.core.files import SELECTED_PARQUET
    from mods.core.stage import CPU, STAGES, Stage, StageContext, StageParams, read_table, register
    from tasks import stage_task

    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    section = doc[doc.index("### Adding a stage"):doc.index("## One engine")]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {"__name__": "docs_example", "Any": Any, "Field": Field, "json": json, "CPU": CPU, "Stage": Stage,
                 "StageContext": StageContext, "StageParams": StageParams, "read_table": read_table,
                 "register": register, "SELECTED_PARQUET": SELECTED_PARQUET}
    try:
        exec(code, namespace)
        export = table_artifact(tmp_path, "export", {"selected.parquet": pd.DataFrame({"output": ["a", "bbb", "cc"]})})
        outcome = execute(tmp_path, "selection_lengths", {}, {"export": export}, progress=False)
        assert outcome.executed and outcome.summary["rows"] == 3 and outcome.summary["0.5"] == 2.0
        assert json.loads((outcome.artifact.dir(tmp_path) / "lengths.json").read_text())["0.99"] <= 3.0
        assert not execute(tmp_path, "selection_lengths", {}, {"export": export}, progress=False).executed
        # In the pipeline's list it gets its defaults and becomes a task tagged with its resource.
        monkeypatch.setattr(mods.pipeline, "PIPELINE", (*mods.pipeline.PIPELINE, "selection_lengths"))
        params = mods.pipeline.stage_params(PipelineConfig(), ["pool.jsonl"])
        assert params["selection_lengths"] == namespace["SelectionLengthsParams"]()
        # Its parameters from the configuration's `stages` section, checked by its model.
        config = PipelineConfig(stages={"selection_lengths": {"quantiles": [0.5]}})
        assert mods.pipeline.stage_params(config, ["pool.jsonl"])["selection_lengths"].quantiles == [0.5]
        with pytest.raises(ValidationError, match="quantiles"):
            mods.pipeline.stage_params(PipelineConfig(stages={"selection_lengths": {"quantiles": "many"}}), [])
        with pytest.raises(ValueError, match="stages: quality is not a pipeline stage without a section"):
            mods.pipeline.stage_params(PipelineConfig(stages={"quality": {}}), [])
        # A declared output the body does not write fails the run.
        monkeypatch.setattr(namespace["SelectionLengths"], "outputs", ("lengths.json", "missing.json"))
        with pytest.raises(MissingOutputError, match="did not write missing.json"):
            execute(tmp_path, "selection_lengths", {"quantiles": [0.25]}, {"export": export}, progress=False)
        assert "resource:cpu" in stage_task("selection_lengths").tags
    finally:
        STAGES.pop("selection_lengths", None)
        stage_task.cache_clear()


def test_a_ctrl_c_that_python_dropped_still_stops_the_stage_at_the_next_block(tmp_path):
    """Python drops a KeyboardInterrupt raised while a finalizer runs ("Exception ignored in
    ..."): the run would go on. The Ctrl-C handler also sets a flag, and the engine stops at
    the next block without writing the artifact."""
    import pandas as pd
    import pytest
    from stage_helpers import AnyParams

    from mods.core import faults
    from mods.core.engine import Engine
    from mods.core.stage import STAGES, RowwiseStage

    seen: list[int] = []

    class Counting(RowwiseStage):
        name, version, description, params = "counting", "1", "counts blocks", AnyParams

        def load(self, inputs, params):
            return pd.DataFrame({"x": range(10)})

        def row_keys(self, rows):
            return rows["x"].astype(str), rows["x"]

        def block_rows(self, params):
            return 2

        def process_batch(self, state, block, params):
            seen.append(len(block))
            if len(seen) == 2:
                faults.interrupted.set()  # what the handler does before its KeyboardInterrupt is lost
            return pd.DataFrame({"y": block["x"] * 2})

        def assemble(self, ctx, params, rows, results):
            results.to_parquet(ctx.out / "y.parquet")
            return {}

    STAGES["counting"] = stage = Counting()
    engine = Engine(tmp_path, progress=False)
    try:
        run = engine.resolve(stage, {}, {})
        with pytest.raises(KeyboardInterrupt):
            engine.run(run)
        assert seen == [2, 2]  # the third block never started
        assert not engine.is_complete(run) and engine.row_store(run).known_keys() == set()
        faults.interrupted.clear()
        assert engine.run(run).executed and seen == [2, 2] + [2] * 5  # the next run does the work
    finally:
        faults.interrupted.clear()
        STAGES.pop("counting", None)


def test_a_ctrl_c_dropped_in_a_finalizer_prints_nothing_and_other_errors_still_reach_the_hook():
    """Python cannot raise a KeyboardInterrupt that lands in a finalizer: it prints a
    traceback instead. Under catching_interrupts that one is silent; others are not."""
    import sys

    from mods.core.faults import catching_interrupts

    seen: list[type] = []

    class RaisesWhenCollected:
        def __init__(self, error: BaseException) -> None:
            self.error = error

        def __del__(self) -> None:
            raise self.error

    import signal

    previous = sys.unraisablehook
    # As in a terminal's foreground job; a background job inherits SIGINT ignored, and
    # catching_interrupts leaves an ignored SIGINT (and the hook) alone.
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = lambda unraisable: seen.append(type(unraisable.exc_value))
    try:
        with catching_interrupts():
            RaisesWhenCollected(KeyboardInterrupt())  # collected at once (reference count 0)
            RaisesWhenCollected(ValueError("a real bug"))
        assert seen == [ValueError]
        assert sys.unraisablehook is not previous  # not interrupted: the recorder is back
        RaisesWhenCollected(KeyboardInterrupt())
        assert seen == [ValueError, KeyboardInterrupt]
    finally:
        sys.unraisablehook = previous
        signal.signal(signal.SIGINT, previous_sigint)
