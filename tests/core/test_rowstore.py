"""Shards of the row store (mods/rowstore.py): whole blocks, every row once, run costliest
first and then alternating, so that rows done track work done."""

from __future__ import annotations

import pandas as pd

from mods.core.rowstore import ROW_KEY, blocks, cut_shards, run_order


def work(n: int) -> pd.DataFrame:
    # Costs in reverse of key order, so sorting by cost is visible.
    return pd.DataFrame({ROW_KEY: [f"k{i:03d}" for i in range(n)], "cost": [n - i for i in range(n)]})


def test_run_order_alternates_costliest_and_cheapest():
    assert run_order(1) == [0]
    assert run_order(5) == [4, 0, 3, 1, 2]
    assert run_order(6) == [5, 0, 4, 1, 3, 2]
    assert sorted(run_order(7)) == list(range(7))


def test_shards_are_whole_blocks_cover_every_row_once_and_run_costliest_first():
    frame = work(45)
    shards = cut_shards(frame, block_rows=4, rows_per_shard=10)  # 12 rows (3 blocks) per shard
    assert [s.index for s in shards] == list(range(len(shards)))
    keys = [k for s in shards for k in s.row_keys]
    assert sorted(keys) == sorted(frame[ROW_KEY]) and len(keys) == len(set(keys))
    cost = dict(zip(frame[ROW_KEY], frame["cost"]))
    mean = [sum(cost[k] for k in s.row_keys) / len(s.row_keys) for s in shards]
    assert mean[0] == max(mean) and mean[1] == min(mean)
    # Every shard but the costliest tail is a whole number of blocks.
    assert all(len(s.row_keys) % 4 == 0 for s in shards[1:])


def test_the_rows_left_after_some_shards_finished_fall_into_the_same_blocks():
    frame = work(45)
    first = cut_shards(frame, block_rows=4, rows_per_shard=8)
    all_blocks = {tuple(b) for s in first for b in blocks(pd.Series(s.row_keys), 4)}
    finished = {k for s in first[:3] for k in s.row_keys}  # killed after three shards
    left = frame[~frame[ROW_KEY].isin(finished)]
    for rows_per_shard in (4, 8, 100):  # the rerun may cut other shard sizes
        again = cut_shards(left, block_rows=4, rows_per_shard=rows_per_shard)
        for shard in again:
            assert {tuple(b) for b in blocks(pd.Series(shard.row_keys), 4)} <= all_blocks


def test_a_parts_seconds_travel_in_its_metadata(tmp_path):
    from mods.core.artifacts import Workspace
    from mods.core.rowstore import RowStore

    store = RowStore(Workspace(tmp_path), "quality", "f" * 16)
    shards = cut_shards(work(8), block_rows=4, rows_per_shard=4)
    for shard, seconds in zip(shards, (1.5, None)):
        store.write_part(shard, pd.DataFrame({ROW_KEY: list(shard.row_keys), "x": range(len(shard.row_keys))}),
                         seconds=seconds)
    assert store.part_seconds(shards) == 1.5  # a part without a time counts 0
    assert store.read(list(shards[0].row_keys))["x"].tolist() == [0, 1, 2, 3]
