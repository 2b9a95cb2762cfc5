"""Quality scorers on tiny random models (fast); one e2e test on the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mods.scoring import LikelihoodScorer, RewardModelScorer, ScorerConfig, build_scorer

try:  # works whether or not tests/ is a package
    from tests.tiny_models import make_tiny_llama, make_tiny_reward_model
except ImportError:
    from tiny_models import make_tiny_llama, make_tiny_reward_model

INS = [
    "Give three tips for staying healthy.",
    "What are the three primary colors?",
    "Translate the sentence into French.",
    "Summarize the text.",
    "Compute 12 + 7 * 3.",
]
INP = ["", "", "I am a student.", "The waves roll in, the gulls cry out, the tide goes back again. " * 3, ""]
OUT = [
    "Eat a balanced diet, exercise regularly and sleep well.",
    "Red, blue and yellow.",
    "Je suis un etudiant.",
    "The sea moves.",
    "33",
]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "llama")


def _rm(path: Path, **kw) -> RewardModelScorer:
    cfg = ScorerConfig(kind="reward-model", model=str(path), device="cpu", precision="float32", **kw)
    return build_scorer(cfg)  # type: ignore[return-value]


def _lik(path: Path, **kw) -> LikelihoodScorer:
    kw.setdefault("max_length", 256)
    kw.setdefault("batch_size", 4)
    return build_scorer(ScorerConfig(model=str(path), device="cpu", precision="float32", **kw))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- config


def test_config_fields_are_described() -> None:
    for name, field in ScorerConfig.model_fields.items():
        assert field.description, name
    assert ScorerConfig().kind == "likelihood"


def test_length_mismatch_is_error(tiny_rm: Path) -> None:
    with pytest.raises(ValueError, match="differ in length"):
        _rm(tiny_rm, batch_size=2).score(INS, INP[:2], OUT, progress=False)


# ----------------------------------------------------------------------------- reward model


def test_reward_one_finite_float_per_row(tiny_rm: Path) -> None:
    df = _rm(tiny_rm, batch_size=2, max_length=64).score(INS, INP, OUT, progress=False)
    assert isinstance(df, pd.DataFrame) and len(df) == len(INS)
    assert df["quality_score"].dtype == np.float64
    assert np.isfinite(df["quality_score"]).all()


def test_reward_invariant_to_batch_size_and_order(tiny_rm: Path) -> None:
    base = _rm(tiny_rm, batch_size=1).score(INS, INP, OUT, progress=False)["quality_score"].to_numpy()
    big = _rm(tiny_rm, batch_size=8).score(INS, INP, OUT, progress=False)["quality_score"].to_numpy()
    np.testing.assert_allclose(big, base, atol=1e-5)
    perm = [3, 0, 4, 2, 1]
    permuted = _rm(tiny_rm, batch_size=2).score(
        [INS[i] for i in perm], [INP[i] for i in perm], [OUT[i] for i in perm], progress=False
    )["quality_score"].to_numpy()
    np.testing.assert_allclose(permuted, base[perm], atol=1e-5)


def test_reward_truncates_long_rows(tiny_rm: Path) -> None:
    long_out = "word " * 2000
    df = _rm(tiny_rm, max_length=32).score(["Say words."] * 2, ["", ""], [long_out, "ok"], progress=False)
    assert np.isfinite(df["quality_score"]).all()
    assert df["truncated"].tolist() == [True, False]


def test_reward_input_joined_like_reference(tiny_rm: Path) -> None:
    # question = instruction + "\n" + input; an empty input adds nothing.
    s = _rm(tiny_rm)
    a = s.score(["Do it."], [""], ["Done."], progress=False)["quality_score"].iloc[0]
    b = s.score(["Do it."], [None], ["Done."], progress=False)["quality_score"].iloc[0]  # type: ignore[list-item]
    c = s.score(["Do it."], [pd.NA], ["Done."], progress=False)["quality_score"].iloc[0]  # type: ignore[list-item]
    assert a == pytest.approx(b) and a == pytest.approx(c)


def test_reward_two_labels_is_clear_error(tmp_path: Path) -> None:
    path = make_tiny_reward_model(tmp_path / "cls2", num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2"):
        _rm(path)


def test_reward_missing_folder_is_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a local model folder"):
        _rm(tmp_path / "nope")
    with pytest.raises(ValueError, match="needs 'model'"):
        build_scorer(ScorerConfig(kind="reward-model"))


def test_reward_fingerprint(tiny_rm: Path) -> None:
    fp = _rm(tiny_rm).fingerprint()
    assert fp["kind"] == "reward-model" and fp["model_hash"] and fp["max_length"] == 512
    assert fp == _rm(tiny_rm, batch_size=3).fingerprint()  # batch size does not change scores


# ----------------------------------------------------------------------------- likelihood


def test_likelihood_shapes_and_columns(tiny_llama: Path) -> None:
    df = _lik(tiny_llama).score(INS, INP, OUT, progress=False)
    assert len(df) == len(INS)
    assert df["quality_score"].dtype == np.float64
    assert np.isfinite(df["quality_score"]).all()
    for col in ("lp_answer", "lp_answer_neutral", "pmi", "lp_end", "answer_truncated", "answer_tokens"):
        assert col in df.columns
    assert not df["answer_truncated"].any()
    assert (df["lp_answer"] < 0).all() and np.isfinite(df["lp_end"]).all()
    np.testing.assert_allclose(df["pmi"], df["lp_answer"] - df["lp_answer_neutral"])


def test_likelihood_invariant_to_batch_size_and_order(tiny_llama: Path) -> None:
    cols = ["quality_score", "lp_answer", "pmi", "lp_end"]
    base = _lik(tiny_llama, batch_size=1).score(INS, INP, OUT, progress=False)[cols].to_numpy()
    big = _lik(tiny_llama, batch_size=16).score(INS, INP, OUT, progress=False)[cols].to_numpy()
    np.testing.assert_allclose(big, base, atol=1e-4)
    perm = [4, 2, 0, 3, 1]
    permuted = _lik(tiny_llama, batch_size=2).score(
        [INS[i] for i in perm], [INP[i] for i in perm], [OUT[i] for i in perm], progress=False
    )[cols].to_numpy()
    np.testing.assert_allclose(permuted, base[perm], atol=1e-4)


def test_likelihood_flags_answers_cut_by_max_length(tiny_llama: Path) -> None:
    long_out = "The waves roll in and the gulls cry out. " * 40
    df = _lik(tiny_llama, max_length=64).score(
        ["Write about the sea.", "Write about the sea."], ["", ""], [long_out, "The sea."], progress=False
    )
    assert df["answer_truncated"].tolist() == [True, False]
    assert np.isnan(df["lp_end"].iloc[0]) and np.isfinite(df["lp_end"].iloc[1])
    assert np.isfinite(df["quality_score"]).all()
    assert df["answer_tokens"].iloc[0] <= 64


def test_likelihood_long_prompt_is_shortened_not_the_answer(tiny_llama: Path) -> None:
    df = _lik(tiny_llama, max_length=64).score(["Summarize."], ["blah " * 500], ["Short."], progress=False)
    assert not df["answer_truncated"].iloc[0]
    assert np.isfinite(df["quality_score"].iloc[0])


def test_likelihood_empty_input_and_output(tiny_llama: Path) -> None:
    s = _lik(tiny_llama)
    df = s.score(["Say hi.", "Say hi.", "Say hi."], ["", None, ""], ["Hi!", "Hi!", ""], progress=False)  # type: ignore[list-item]
    assert df["quality_score"].iloc[0] == pytest.approx(df["quality_score"].iloc[1])
    assert df["answer_tokens"].iloc[2] == 0
    assert df["quality_score"].iloc[2] < df["quality_score"].iloc[0]


def test_likelihood_without_chat_template(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "plain", chat_template=False)
    df = _lik(path).score(INS[:2], INP[:2], OUT[:2], progress=False)
    assert np.isfinite(df["quality_score"]).all()


def test_likelihood_fingerprint(tiny_llama: Path) -> None:
    fp = _lik(tiny_llama).fingerprint()
    assert fp["kind"] == "likelihood" and fp["max_length"] == 256 and "weights" in fp
    assert fp["model_hash"] == _lik(tiny_llama, batch_size=1).fingerprint()["model_hash"]


# ----------------------------------------------------------------------------- real model


@pytest.mark.e2e
def test_smollm2_prefers_correct_answer_to_shuffled() -> None:
    rows = [
        ("What is the capital of France?", "", "The capital of France is Paris."),
        ("Give three tips for staying healthy.", "",
         "1. Eat a balanced diet with plenty of fruit and vegetables.\n2. Exercise regularly.\n3. Get enough sleep."),
        ("Translate into French.", "Good morning, my friend.", "Bonjour, mon ami."),
        ("Name the largest planet in the solar system.", "", "Jupiter is the largest planet in the solar system."),
    ]
    rng = np.random.default_rng(0)
    shuffled = [" ".join(rng.permutation(o.split())) for _, _, o in rows]
    scorer = build_scorer(ScorerConfig(batch_size=8, max_length=256))
    ins = [r[0] for r in rows] * 2
    inp = [r[1] for r in rows] * 2
    out = [r[2] for r in rows] + shuffled
    q = scorer.score(ins, inp, out, progress=False)["quality_score"].to_numpy()
    assert (q[: len(rows)] > q[len(rows) :]).all(), q


def test_likelihood_shortcuts_do_not_change_scores(tiny_llama: Path) -> None:
    # Shared-prefix KV cache, trimmed LM head and length sorting are pure speed-ups.
    cols = ["lp_answer", "lp_answer_neutral", "lp_end"]
    scorer = _lik(tiny_llama, batch_size=3)
    fast = scorer.features(INS, INP, OUT, progress=False)[cols].to_numpy()
    assert scorer.last_prefix_len > 0  # the chat template's shared start was cached
    plain = _lik(tiny_llama, batch_size=3)
    plain._use_prefix_cache = plain._trim_logits = plain._sort_by_length = False
    slow = plain.features(INS, INP, OUT, progress=False)[cols].to_numpy()
    np.testing.assert_allclose(fast, slow, atol=1e-4)
