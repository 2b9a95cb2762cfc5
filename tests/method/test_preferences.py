"""Human preference pairs: loading, agreement, instruction-grouped folds, the pairwise head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mods.evaluation.preferences import (
    agreement,
    fit_pairwise_logistic,
    grouped_folds,
    human_pairs,
    length_only,
    load_preference_pairs,
    unique_rows,
)


def _record(idx: int, ins: str, a: object, b: object, votes: tuple[int, int, int], inp: str = "") -> dict:
    return {"idx": idx, "cmp_key": "x_y", "instruction": ins, "input": inp, "response1": a, "response2": b,
            "annotator1": votes[0], "annotator2": votes[1], "annotator3": votes[2]}


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    records = [
        _record(0, "Name a colour.", "Red.", "Blue is a colour.", (2, 2, 2)),      # unanimous b
        _record(1, "Name a colour.", "Green.", "Pink.", (1, 1, 1)),                # unanimous a, length-matched
        _record(2, "Add 2 and 2.", "4", "Four.", (1, 1, 2)),                      # majority a, not unanimous
        _record(3, "Add 2 and 2.", "4", "5", (0, 0, 0)),                          # unanimous tie
        _record(4, "Say yes.", False, "Yes.", (2, 2, 2)),                         # not text
        _record(5, "Say no.", "   ", "No.", (2, 2, 2)),                           # blank answer
        _record(6, "Say hi.", "Hello there.", "Hi!", (1, 1, 1), inp="to Bob"),    # unanimous a
    ]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(records))
    return path


def test_load_columns_votes_and_groups(small_file: Path) -> None:
    pairs = load_preference_pairs(small_file)
    assert len(pairs) == 7
    assert pairs["human"].tolist()[:3] == [1, 0, 0]
    assert pd.isna(pairs["human"].iloc[3])  # a tie has no preferred answer
    assert pairs["unanimous"].tolist() == [True, True, False, True, True, True, True]
    assert pairs["answer_a"].isna().iloc[4]  # a JSON boolean is not an answer
    # One group per instruction text: records 0/1 and 2/3 share theirs.
    g = pairs["group"].tolist()
    assert g[0] == g[1] and g[2] == g[3] and len(set(g)) == 5
    assert pairs["length_matched"].tolist() == [False, True, False, True, False, False, False]


def test_human_pairs_keeps_unanimous_non_tie_text_pairs(small_file: Path) -> None:
    pairs = human_pairs(small_file)
    assert pairs["pair_id"].tolist() == [0, 1, 6]
    assert pairs["human"].tolist() == [1, 0, 0] and pairs["human"].dtype == np.int64
    assert pairs["input"].tolist() == ["", "", "to Bob"]


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_preference_pairs(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        load_preference_pairs(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match="record 0 lacks"):
        load_preference_pairs(tmp_path / "odd.json")


def test_agreement_known_answers() -> None:
    human = [0, 1, 1, 0]
    # Right, right, wrong, tie -> (1 + 1 + 0 + 0.5) / 4.
    assert agreement([2.0, 0.0, 5.0, 3.0], [1.0, 1.0, 4.0, 3.0], human) == pytest.approx(0.625)
    # A NaN score is a tie too.
    assert agreement([np.nan, 1.0], [1.0, 2.0], [1, 1]) == pytest.approx(0.75)
    # Swapping a and b and flipping the labels changes nothing.
    assert agreement([1.0, 1.0, 4.0, 3.0], [2.0, 0.0, 5.0, 3.0], [1, 0, 0, 1]) == pytest.approx(0.625)
    assert agreement([0, 0, 0], [0, 0, 0], [0, 1, 1]) == pytest.approx(0.5)  # a constant scorer is a coin
    with pytest.raises(ValueError, match="one length"):
        agreement([1.0], [1.0, 2.0], [0, 1])
    with pytest.raises(ValueError, match="hold 0"):
        agreement([1.0], [2.0], [2])


def test_length_only_prefers_the_longer_answer() -> None:
    a, b = length_only(["short", "a much longer answer"], ["longer one", "tiny"])
    assert agreement(a, b, [1, 0]) == 1.0


def test_grouped_folds_never_split_an_instruction() -> None:
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 37, size=400)
    folds = grouped_folds(groups, 5, seed=3)
    assert len(folds) == 5
    measured = np.concatenate([m for _, m in folds])
    assert sorted(measured.tolist()) == list(range(400))  # every pair measured exactly once
    for fit, meas in folds:
        assert not set(groups[fit]) & set(groups[meas])
        assert len(fit) + len(meas) == 400
    sizes = [len(m) for _, m in folds]
    assert max(sizes) - min(sizes) <= max(np.bincount(groups))  # dealt to the emptiest fold
    assert [m.tolist() for _, m in grouped_folds(groups, 5, seed=3)] == [m.tolist() for _, m in folds]
    assert [m.tolist() for _, m in grouped_folds(groups, 5, seed=4)] != [m.tolist() for _, m in folds]
    with pytest.raises(ValueError, match="k must be"):
        grouped_folds([1, 1, 2], 3)


def test_pairwise_head_learns_the_informative_feature() -> None:
    rng = np.random.default_rng(0)
    diff = rng.normal(size=(300, 3))
    human = (diff[:, 1] + 0.3 * rng.normal(size=300) > 0).astype(int)  # b preferred when feature 1 is higher
    w = fit_pairwise_logistic(diff, human, l2=1.0)
    assert np.argmax(np.abs(w)) == 1 and w[1] > 0
    assert agreement(np.zeros(300), diff @ w, human) > 0.85
    # Swapping every pair gives the opposite weights' scores: no first-answer bias.
    np.testing.assert_allclose(fit_pairwise_logistic(-diff, 1 - human, l2=1.0), w, atol=1e-8)


def test_unique_rows_scores_each_answer_once() -> None:
    pairs = pd.DataFrame({"instruction": ["i", "i", "j"], "input": ["", "", ""],
                          "answer_a": ["x", "y", "x"], "answer_b": ["y", "z", "y"]})
    rows, ia, ib = unique_rows(pairs)
    assert len(rows) == 5  # (i,x) (i,y) (i,z) (j,x) (j,y)
    assert rows["output"].iloc[ia].tolist() == ["x", "y", "x"]
    assert rows["output"].iloc[ib].tolist() == ["y", "z", "y"]
    assert rows["instruction"].iloc[ia].tolist() == ["i", "i", "j"]


@pytest.mark.shared_data
def test_pandalm_counts(shared_data: Path) -> None:
    path = shared_data / "preferences" / "pandalm_testset_v1.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    pairs = human_pairs(path)
    assert len(pairs) == 742 and pairs["group"].nunique() == 150 and int(pairs["length_matched"].sum()) == 176
