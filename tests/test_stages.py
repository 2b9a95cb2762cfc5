import numpy as np

from mods.stages import pickable_rows


def test_pickable_rows_counts_distinct_non_center_vectors():
    m = np.array([[0, 0], [0, 0], [1, 0], [1, 0], [2, 2]], dtype=np.float32)
    assert pickable_rows(m, []) == 3
    assert pickable_rows(m, [0]) == 2          # [0,0] is a center: its duplicate cannot be picked
    assert pickable_rows(m, [0, 4]) == 1
    assert pickable_rows(m[:0], []) == 0
