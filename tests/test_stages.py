import numpy as np

from mods.stages import pickable_rows


def test_pickable_rows_counts_distinct_non_center_vectors():
    m = np.array([[0, 0], [0, 0], [1, 0], [1, 0], [2, 2]], dtype=np.float32)
    assert pickable_rows(m, []) == 3
    assert pickable_rows(m, [0]) == 2          # [0,0] is a center: its duplicate cannot be picked
    assert pickable_rows(m, [0, 4]) == 1
    assert pickable_rows(m[:0], []) == 0


def test_out_of_memory_block_is_split_until_it_fits():
    import pandas as pd
    import torch

    from mods.stages import Rowwise, compute_block

    seen: list[int] = []

    def compute(state, block, params):
        seen.append(len(block))
        if len(block) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return pd.DataFrame({"double": block["x"] * 2})

    rowwise = Rowwise(load=None, keys=None, setup=None, compute=compute, assemble=None, block_rows=lambda p: 8,
                      fingerprint_extra=lambda p, i: [])
    block = pd.DataFrame({"x": range(8)})
    result = compute_block(rowwise, None, block, None, "demo")
    assert result["double"].tolist() == [2 * x for x in range(8)]
    assert seen[0] == 8 and max(seen[1:]) <= 4 and sum(n for n in seen if n <= 2) == 8


def test_a_deterministic_error_is_not_split_or_retried():
    import pandas as pd
    import pytest
    from prefect.states import Failed

    from mods.stages import Rowwise, compute_block
    from tasks._stage import retry_if_transient

    calls = []

    def compute(state, block, params):
        calls.append(len(block))
        raise ValueError("bad row")

    rowwise = Rowwise(load=None, keys=None, setup=None, compute=compute, assemble=None, block_rows=lambda p: 8,
                      fingerprint_extra=lambda p, i: [])
    with pytest.raises(ValueError):
        compute_block(rowwise, None, pd.DataFrame({"x": range(8)}), None, "demo")
    assert calls == [8]
    import torch

    assert not retry_if_transient(None, None, Failed(data=ValueError("bad row")))
    assert retry_if_transient(None, None, Failed(data=torch.OutOfMemoryError("simulated")))
    assert retry_if_transient(None, None, Failed(data=TimeoutError("nfs")))


def test_training_out_of_memory_retries_with_half_the_batch_and_the_same_global_batch(tmp_path, monkeypatch):
    import pandas as pd
    import torch

    import mods.training
    from mods.artifacts import StageContext, Workspace
    from mods.stages import TrainingParams, _train
    from mods.training import TrainConfig

    pd.DataFrame({"id": ["a"], "instruction": ["i"], "input": [""], "output": ["o"]}).to_parquet(tmp_path / "rows.parquet")
    pd.DataFrame({"id": ["a"]}).to_parquet(tmp_path / "selected.parquet")
    tried = []

    def fake_train(base_model, rows, config, out_dir, progress=True, checkpoint_dir=None):
        tried.append((config.batch_size, config.gradient_accumulation))
        if config.batch_size > 2:
            raise torch.OutOfMemoryError("simulated")
        return {"ok": True}

    monkeypatch.setattr(mods.training, "train_model", fake_train)
    ctx = StageContext(out=tmp_path, inputs={"high_quality": tmp_path, "seed_select": tmp_path}, scratch=tmp_path / "s",
                       workspace=Workspace(tmp_path))
    params = TrainingParams(base_model="x", train=TrainConfig(batch_size=8, gradient_accumulation=1))
    assert _train(ctx, params, ["seed_select"]) == {"ok": True}
    assert tried == [(8, 1), (4, 2), (2, 4)]


def test_a_server_away_is_transient_a_bad_value_is_not():
    import httpx

    from mods.faults import is_transient

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
