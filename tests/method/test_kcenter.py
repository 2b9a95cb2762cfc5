"""Greedy k-center semantics against a brute-force float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mods.selection.kcenter_backends as kc
from mods.selection.kcenter import KCenterResult, first_center, k_center_greedy


def reference(x: np.ndarray, k: int, already_selected=(), seed: int = 0):
    """Plain numpy float64 farthest-first traversal, ties to the lowest index."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    mind = np.full(n, np.inf)
    for s in already_selected:
        mind = np.minimum(mind, np.linalg.norm(x - x[s], axis=1))
    picks, pick_d, radii = [], [], []
    for t in range(k):
        if t == 0 and len(already_selected) == 0:
            i, d = int(np.random.default_rng(seed).integers(n)), np.nan
        else:
            d = mind.max()
            if d == 0:
                raise ValueError("exhausted")
            i = int(np.flatnonzero(mind == d)[0])
        picks.append(i)
        pick_d.append(d)
        mind = np.minimum(mind, np.linalg.norm(x - x[i], axis=1))
        radii.append(mind.max())
    return np.array(picks, dtype=np.int64), np.array(pick_d), np.array(radii)


def coverage_radius(x: np.ndarray, centers: np.ndarray) -> float:
    """Max over rows of the distance to the nearest center, from a full distance matrix."""
    x = np.asarray(x, dtype=np.float64)
    dist = np.linalg.norm(x[:, None, :] - x[None, centers, :], axis=2)
    return float(dist.min(axis=1).max())


def assert_matches_reference(x, res: KCenterResult, k, already_selected=(), seed=0):
    ref_idx, ref_pd, ref_radii = reference(x, k, already_selected, seed)
    np.testing.assert_array_equal(res.indices, ref_idx)
    np.testing.assert_allclose(res.pick_distances, ref_pd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.radii, ref_radii, rtol=1e-5, atol=1e-6)


def clustered(n: int, d: int, n_clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=5.0, size=(n_clusters, d))
    return (means[rng.integers(n_clusters, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("n,d,k", [(40, 2, 40), (200, 8, 50), (1000, 32, 100), (300, 384, 60)])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_data_matches_reference(n, d, k, seed):
    x = np.random.default_rng(100 + seed).normal(size=(n, d)).astype(np.float32)
    res = k_center_greedy(x, k, seed=seed, device="cpu")
    assert res.indices.dtype == np.int64
    assert res.pick_distances.dtype == np.float32 and res.radii.dtype == np.float32
    assert res.indices.shape == res.pick_distances.shape == res.radii.shape == (k,)
    assert res.indices[0] == np.random.default_rng(seed).integers(n)
    assert np.isnan(res.pick_distances[0])
    assert len(set(res.indices.tolist())) == k
    assert_matches_reference(x, res, k, seed=seed)


def test_clustered_data_matches_reference(backend):
    x = clustered(2000, 16, 30, seed=3)
    res = k_center_greedy(x, 150, seed=5, device="cpu")
    assert_matches_reference(x, res, 150, seed=5)


def test_radii_are_the_coverage_radius_and_monotone():
    x = clustered(400, 5, 8, seed=11)
    res = k_center_greedy(x, 60, seed=2, device="cpu")
    assert np.all(np.diff(res.radii) <= 0)
    for t in [0, 1, 5, 20, 59]:
        assert res.radii[t] == pytest.approx(coverage_radius(x, res.indices[: t + 1]), rel=1e-5)
    # A pick's distance is the radius before it: it is the farthest row.
    np.testing.assert_array_equal(res.pick_distances[1:], res.radii[:-1])


def test_ties_go_to_lowest_index_on_a_grid(backend):
    # 5 x 5 integer grid: distances are exact in float32, so ties are real ties.
    g = np.array([(i, j) for i in range(5) for j in range(5)], dtype=np.float32)
    res = k_center_greedy(g, 10, already_selected=[12], device="cpu")  # 12 is the middle
    # Four corners (0, 4, 20, 24) are equally far from the middle: lowest wins.
    assert res.indices[0] == 0
    assert res.pick_distances[0] == pytest.approx(np.sqrt(8))
    # 4, 20 and 24 are then all sqrt(8) from {12, 0}: lowest first, every time.
    assert res.indices[:4].tolist() == [0, 4, 20, 24]
    assert_matches_reference(g, res, 10, already_selected=[12])


def test_ties_with_the_maximum_at_both_ends(backend):
    # Rows 0 and 9 are tied farthest from the center row 5; the lowest must win
    # even though the row before it in memory order is the other one.
    x = np.zeros((10, 3), dtype=np.float32)
    x[1:9, 1] = np.arange(8) * 0.1
    x[5] = 0.0
    x[0] = [-3, 0, 0]
    x[9] = [3, 0, 0]
    res = k_center_greedy(x, 1, already_selected=[5], device="cpu")
    assert res.indices.tolist() == [0]
    res = k_center_greedy(x[::-1].copy(), 1, already_selected=[4], device="cpu")
    assert res.indices.tolist() == [0]


@pytest.mark.parametrize("seed", [0, 3])
def test_grid_with_random_first_center(seed):
    g = np.array([(i, j) for i in range(7) for j in range(6)], dtype=np.float32)
    res = k_center_greedy(g, 20, seed=seed, device="cpu")
    assert_matches_reference(g, res, 20, seed=seed)


def test_duplicates_are_never_picked_and_exhaustion_is_a_clear_error(backend):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(10, 6)).astype(np.float32)
    x = np.repeat(base, 3, axis=0)[rng.permutation(30)]
    res = k_center_greedy(x, 10, seed=1, device="cpu")
    picked = x[res.indices]
    assert len(np.unique(picked, axis=0)) == 10
    assert np.all(res.pick_distances[1:] > 0)
    assert res.radii[-1] == 0.0
    assert_matches_reference(x, res, 10, seed=1)
    with pytest.raises(ValueError, match=r"only 10 distinct rows"):
        k_center_greedy(x, 11, seed=1, device="cpu")
    # A copy of a base row among already_selected leaves 9 distinct rows.
    with pytest.raises(ValueError, match=r"only 9 distinct rows"):
        k_center_greedy(x, 10, already_selected=[0], device="cpu")
    res = k_center_greedy(x, 9, already_selected=[0], device="cpu")
    assert not np.any(np.all(x[res.indices] == x[0], axis=1))


def test_already_selected_rows_are_centers_not_picks(backend):
    x = clustered(500, 4, 6, seed=8)
    sel = [3, 77, 250, 499]
    res = k_center_greedy(x, 40, already_selected=sel, seed=123, device="cpu")
    assert not set(res.indices.tolist()) & set(sel)
    assert np.isfinite(res.pick_distances).all()
    assert res.pick_distances[0] == pytest.approx(coverage_radius(x, np.array(sel)), rel=1e-6)
    assert res.radii[9] == pytest.approx(
        coverage_radius(x, np.concatenate([sel, res.indices[:10]])), rel=1e-6
    )
    assert_matches_reference(x, res, 40, already_selected=sel)
    # Order of already_selected and the seed do not matter.
    res2 = k_center_greedy(x, 40, already_selected=np.array(sel[::-1]), seed=9, device="cpu")
    np.testing.assert_array_equal(res.indices, res2.indices)


def test_k_larger_than_available_rows():
    x = np.random.default_rng(0).normal(size=(5, 2))
    with pytest.raises(ValueError, match=r"k=4 exceeds the 3 rows"):
        k_center_greedy(x, 4, already_selected=[0, 1], device="cpu")
    res = k_center_greedy(x, 5, device="cpu")
    assert sorted(res.indices.tolist()) == [0, 1, 2, 3, 4]


def test_k_zero():
    x = np.random.default_rng(0).normal(size=(5, 2))
    res = k_center_greedy(x, 0, device="cpu")
    assert res.indices.shape == (0,) and res.indices.dtype == np.int64
    assert res.pick_distances.shape == (0,) and res.radii.dtype == np.float32


@pytest.mark.parametrize(
    "x,kwargs,message",
    [
        (np.zeros(5), {}, "2-D"),
        (np.zeros((2, 3, 4)), {}, "2-D"),
        (np.zeros((4, 0)), {}, "0 columns"),
        (np.array([[0.0, 1.0], [np.nan, 2.0]]), {}, "NaN or inf"),
        (np.array([[0.0, 1.0], [np.inf, 2.0], [1.0, 1.0]]), {}, r"NaN or inf \(first at row 1\)"),
        (np.array([["a", "b"]]), {}, "numeric"),
        (np.zeros((4, 2)), {"k": -1}, "k must be >= 0"),
        (np.zeros((4, 2)), {"k": 1.5}, "k must be an integer"),
        (np.zeros((4, 2)), {"already_selected": [4]}, "outside"),
        (np.zeros((4, 2)), {"already_selected": [-1]}, "outside"),
        (np.zeros((4, 2)), {"already_selected": [1, 1]}, "duplicate"),
        (np.zeros((4, 2)), {"already_selected": [0.5]}, "integer"),
        (np.zeros((4, 2)), {"already_selected": [[0]]}, "1-D"),
        (np.full((4, 2), 1e30, dtype=np.float64) * np.arange(4)[:, None], {}, "overflow"),
    ],
)
def test_invalid_inputs(x, kwargs, message, backend):
    kwargs = {"k": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        k_center_greedy(x, device="cpu", **kwargs)


BACKENDS = {"numpy": kc.NumpyCoverage, "torch": kc.TorchCoverage}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, monkeypatch):
    """The CPU backend class under test (numpy by default; torch is the CUDA code path)."""
    monkeypatch.setattr(kc, "_NUMPY_ON_CPU", request.param == "numpy")
    return BACKENDS[request.param]


def test_backends_agree_bit_for_bit(monkeypatch):
    x = clustered(3000, 24, 50, seed=23)
    out = {}
    for name in BACKENDS:
        monkeypatch.setattr(kc, "_NUMPY_ON_CPU", name == "numpy")
        out[name] = k_center_greedy(x, 200, already_selected=[5, 7], device="cpu")
    np.testing.assert_array_equal(out["numpy"].indices, out["torch"].indices)
    np.testing.assert_array_equal(out["numpy"].pick_distances, out["torch"].pick_distances)
    np.testing.assert_array_equal(out["numpy"].radii, out["torch"].radii)
    assert_matches_reference(x, out["numpy"], 200, already_selected=[5, 7])


def test_coverage_dispatches_on_device(monkeypatch):
    x = torch.zeros((3, 2))
    assert type(kc.CoverageBackend(x, 2, 8, prune=True)) is kc.NumpyCoverage
    assert type(kc.CoverageBackend(x.numpy(), 2, 8, prune=True)) is kc.NumpyCoverage
    monkeypatch.setattr(kc, "_NUMPY_ON_CPU", False)
    assert type(kc.CoverageBackend(x, 2, 8, prune=True)) is kc.TorchCoverage


@pytest.mark.parametrize("n_clusters", [40, 1])
def test_pruning_skips_work_and_changes_nothing(monkeypatch, backend, n_clusters):
    x = clustered(2000, 8, n_clusters, seed=21)
    evals = {}
    orig = backend.farthest

    def spy(self):
        evals[self.prune] = self.pair_evals
        return orig(self)

    monkeypatch.setattr(backend, "farthest", spy)
    a = k_center_greedy(x, 120, seed=4, device="cpu", prune=True)
    b = k_center_greedy(x, 120, seed=4, device="cpu", prune=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.pick_distances, b.pick_distances)
    np.testing.assert_array_equal(a.radii, b.radii)
    # Only meaningful if the lazy path really did less work than N per center.
    assert evals[False] == 2000 * 120
    assert evals[True] < evals[False]
    assert_matches_reference(x, a, 120, seed=4)


@pytest.mark.parametrize("active_rows", [1, 16])
def test_small_active_sets_many_epochs(monkeypatch, backend, active_rows):
    # Tiny active sets force many lazy epochs and refreshes with mixed stamps.
    orig = backend.__init__
    seen = []

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        self.active_rows = active_rows
        seen.append(type(self))

    monkeypatch.setattr(backend, "__init__", init)
    x = clustered(300, 6, 9, seed=22)
    for sel in ((), (3, 250)):
        res = k_center_greedy(x, 60, already_selected=sel, seed=1, device="cpu")
        assert_matches_reference(x, res, 60, already_selected=sel, seed=1)
    g = np.array([(i, j) for i in range(6) for j in range(6)], dtype=np.float32)
    g = np.concatenate([g, g[::3]])  # ties and duplicates
    res = k_center_greedy(g, 36, seed=2, device="cpu")
    assert_matches_reference(g, res, 36, seed=2)
    with pytest.raises(ValueError, match="only 36 distinct"):
        k_center_greedy(g, 37, seed=2, device="cpu")
    assert seen and set(seen) == {backend}


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 999, 5000])
def test_chunk_sizes_do_not_change_results(chunk_rows, backend):
    x = clustered(1001, 12, 15, seed=5)
    base = k_center_greedy(x, 80, seed=0, device="cpu")
    res = k_center_greedy(x, 80, seed=0, device="cpu", chunk_rows=chunk_rows)
    np.testing.assert_array_equal(res.indices, base.indices)
    np.testing.assert_array_equal(res.radii, base.radii)
    np.testing.assert_array_equal(res.pick_distances, base.pick_distances)


def test_torch_tensor_input():
    x = clustered(600, 10, 12, seed=6)
    base = k_center_greedy(x, 50, seed=3, device="cpu")
    for t in (torch.from_numpy(x), torch.from_numpy(x.astype(np.float64)), torch.from_numpy(x).T.contiguous().T):
        res = k_center_greedy(t, 50, seed=3, device="cpu", already_selected=())
        np.testing.assert_array_equal(res.indices, base.indices)
        np.testing.assert_array_equal(res.radii, base.radii)
    res = k_center_greedy(torch.from_numpy(x), 10, already_selected=torch.tensor([1, 2]), device="cpu")
    assert_matches_reference(x, res, 10, already_selected=[1, 2])


def test_deterministic_for_a_seed_and_seed_picks_the_first_center():
    x = np.random.default_rng(1).normal(size=(300, 7)).astype(np.float32)
    a = k_center_greedy(x, 30, seed=42, device="cpu")
    b = k_center_greedy(x, 30, seed=42, device="cpu")
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.radii, b.radii)
    firsts = {first_center(300, s) for s in range(10)}
    assert len(firsts) > 1  # the seed matters
    for s in range(3):
        assert k_center_greedy(x, 1, seed=s, device="cpu").indices[0] == first_center(300, s)
        assert first_center(300, s) == np.random.default_rng(s).integers(300)


def test_input_is_not_modified():
    x = clustered(200, 4, 5, seed=2)
    copy = x.copy()
    k_center_greedy(x, 20, device="cpu")
    np.testing.assert_array_equal(x, copy)


# --- coverage helpers -------------------------------------------------------

from mods.selection.coverage import coverage_curve, plot_coverage, random_coverage_curve  # noqa: E402


def test_coverage_curve_of_kcenter_order_equals_radii():
    x = clustered(800, 6, 10, seed=31)
    res = k_center_greedy(x, 50, seed=1, device="cpu")
    ks = [1, 2, 10, 50]
    np.testing.assert_array_equal(coverage_curve(x, res.indices, ks), res.radii[np.array(ks) - 1])


def test_random_coverage_curve_matches_brute_force():
    x = clustered(500, 4, 7, seed=32)
    ks = [1, 5, 7, 40]
    curve = random_coverage_curve(x, ks, seed=3)
    order = np.random.default_rng(3).permutation(500)
    expected = [coverage_radius(x, order[:k]) for k in ks]
    np.testing.assert_allclose(curve, expected, rtol=1e-5)
    assert np.all(np.diff(curve) <= 0)
    # Well-separated clusters: 7 k-center picks hit every cluster, 7 random ones rarely do.
    kc_radius = k_center_greedy(x, 7, seed=3, device="cpu").radii[-1]
    assert kc_radius < curve[2]


def test_coverage_curve_rejects_bad_ks_and_order():
    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="ks must lie"):
        coverage_curve(x, [0, 1, 2], [4])
    with pytest.raises(ValueError, match="ks must lie"):
        coverage_curve(x, [0, 1, 2], [0])
    with pytest.raises(ValueError, match="duplicate"):
        coverage_curve(x, [0, 1, 1], [2])


def test_plot_coverage_writes_a_png(tmp_path):
    out = plot_coverage([1, 10, 100], [3.0, 2.0, 1.0], [3.0, 2.5, 2.0], tmp_path / "sub" / "c.png", "t")
    assert out == tmp_path / "sub" / "c.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 1000
    with pytest.raises(ValueError, match="equal length"):
        plot_coverage([1, 2], [1.0], [1.0, 2.0], tmp_path / "x.png", "t")
