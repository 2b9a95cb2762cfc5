"""Quality scorers on tiny random models (fast); one e2e test on the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mods.scoring.config import ScorerConfig
from mods.scoring.likelihood import LikelihoodScorer
from mods.scoring.reward_model import RewardModelScorer
from mods.scoring.scorers import build_scorer

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
    cfg = ScorerConfig(kind="likelihood", model=str(path), device="cpu", precision="float32", **kw)
    return build_scorer(cfg)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- config


def test_config_fields_are_described() -> None:
    for name, field in ScorerConfig.model_fields.items():
        assert field.description, name
    # The default changed to 'preference' when it beat 'likelihood' on held-out human pairs (README).
    assert ScorerConfig().kind == "preference"


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


CONTEXT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a sea."},
           {"role": "assistant", "content": "The North Sea."}]


def test_likelihood_scores_a_turn_after_its_conversation(tiny_llama: Path) -> None:
    """A later turn is scored after the conversation before it (the same tokens as the
    training text up to that answer); no context is a single exchange, as before."""
    from mods.data.prompts import chat_prompt

    s = _lik(tiny_llama)
    alone = s.score(["And a river?"], [""], ["The Rhine."], progress=False)
    plain = s.score(["And a river?"], [""], ["The Rhine."], progress=False, contexts=[[]])
    after = s.score(["And a river?"], [""], ["The Rhine."], progress=False, contexts=[CONTEXT])
    pd.testing.assert_frame_equal(alone, plain)
    assert after["quality_score"].iloc[0] != pytest.approx(alone["quality_score"].iloc[0])
    text = chat_prompt(s.tokenizer, "And a river?", "", CONTEXT)
    assert "Be brief." in text and text.index("North Sea") < text.index("And a river?")
    # Too long for max_length: a later turn keeps the end of its context (its user turn)...
    prompt = list(range(100, 300))
    kept, answer, cut = s._fit(prompt, [5, 6, 7], in_context=True)
    assert kept == prompt[-len(kept):] and len(kept) >= s.config.max_length // 2 and answer == [5, 6, 7] and not cut
    # ...a single exchange the start of its instruction and the assistant header, as before.
    kept, _, _ = s._fit(prompt, [5, 6, 7])
    assert kept[:10] == prompt[:10] and kept[-16:] == prompt[-16:]


def test_reward_model_reads_the_conversation_before_a_turn(tiny_rm: Path) -> None:
    s = _rm(tiny_rm)
    alone = s.score(["And a river?"], [""], ["The Rhine."], progress=False)["quality_score"].iloc[0]
    after = s.score(["And a river?"], [""], ["The Rhine."], progress=False, contexts=[CONTEXT])["quality_score"]
    # Without a chat template: the question is the earlier turns then the user turn.
    joined = s.score(["Be brief.\n\nName a sea.\n\nThe North Sea.\n\nAnd a river?"], [""], ["The Rhine."],
                     progress=False)["quality_score"].iloc[0]
    assert after.iloc[0] == pytest.approx(joined) and after.iloc[0] != pytest.approx(alone)


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
@pytest.mark.parametrize("kind", ["preference", "likelihood"])
def test_smollm2_prefers_correct_answer_to_shuffled(kind: str) -> None:
    rows = [
        ("What is the capital of France?", "", "The capital of France is Paris."),
        ("Give three tips for staying healthy.", "",
         "1. Eat a balanced diet with plenty of fruit and vegetables.\n2. Exercise regularly.\n3. Get enough sleep."),
        ("Translate into French.", "Good morning, my friend.", "Bonjour, mon ami."),
        ("Name the largest planet in the solar system.", "", "Jupiter is the largest planet in the solar system."),
    ]
    rng = np.random.default_rng(0)
    shuffled = [" ".join(rng.permutation(o.split())) for _, _, o in rows]
    scorer = build_scorer(ScorerConfig(kind=kind, batch_size=8, max_length=256))
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


# ----------------------------------------------------------------------------- preference

from mods.scoring.likelihood import EMPTY_SCORE  # noqa: E402
from mods.scoring.preference import (  # noqa: E402
    JUDGE_QUESTION,
    PREFERENCE_HEAD_FILE,
    PreferenceHead,
    PreferenceScorer,
    load_preference_head,
    text_features,
)
from mods.scoring.scorers import SCORER_VERSION  # noqa: E402


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A tiny BERT with MiniLM's tokenizer stands in for MiniLM (sentence-transformers
    # adds mean pooling to a plain encoder folder).
    return make_tiny_reward_model(tmp_path_factory.mktemp("emb") / "emb")


def _pref(llama: Path, embedder: Path, head: PreferenceHead | None = None, **kw) -> PreferenceScorer:
    kw.setdefault("max_length", 256)
    kw.setdefault("batch_size", 4)
    cfg = ScorerConfig(kind="preference", model=str(llama), embedding_model=str(embedder), device="cpu",
                       precision="float32", **kw)
    return PreferenceScorer(cfg, head=head) if head else build_scorer(cfg)  # type: ignore[return-value]


def test_shipped_head_loads_and_names_computable_features(tiny_llama: Path, tiny_embedder: Path) -> None:
    head = load_preference_head()
    assert head.features and len(head.weights) == len(head.features)
    assert any(w != 0 for w in head.weights)
    # Every feature the head names is one the scorer computes.
    feats = _pref(tiny_llama, tiny_embedder).features(INS[:2], INP[:2], OUT[:2], progress=False)
    assert set(head.features) <= set(feats.columns)
    assert PREFERENCE_HEAD_FILE.name in str(PREFERENCE_HEAD_FILE) and "preference" in SCORER_VERSION


def test_preference_one_finite_score_per_row_in_order(tiny_llama: Path, tiny_embedder: Path) -> None:
    scorer = _pref(tiny_llama, tiny_embedder)
    assert isinstance(scorer, PreferenceScorer)
    base = scorer.score(INS, INP, OUT, progress=False)
    assert len(base) == len(INS) and base["quality_score"].dtype == np.float64
    assert np.isfinite(base["quality_score"]).all()
    perm = [3, 0, 4, 2, 1]
    permuted = _pref(tiny_llama, tiny_embedder, batch_size=2).score(
        [INS[i] for i in perm], [INP[i] for i in perm], [OUT[i] for i in perm], progress=False
    )
    np.testing.assert_allclose(permuted["quality_score"], base["quality_score"].to_numpy()[perm], atol=1e-4)
    # A row's score depends on that row alone: scored by itself it gets the same value.
    alone = scorer.score(INS[2:3], INP[2:3], OUT[2:3], progress=False)["quality_score"].iloc[0]
    assert alone == pytest.approx(base["quality_score"].iloc[2], abs=1e-4)


def test_preference_is_deterministic_for_identical_calls(tiny_llama: Path, tiny_embedder: Path) -> None:
    scorer = _pref(tiny_llama, tiny_embedder)
    first = scorer.score(INS, INP, OUT, progress=False)["quality_score"].to_numpy()
    second = _pref(tiny_llama, tiny_embedder).score(INS, INP, OUT, progress=False)["quality_score"].to_numpy()
    assert first.tobytes() == second.tobytes()


def test_preference_empty_answer_scores_lowest(tiny_llama: Path, tiny_embedder: Path) -> None:
    df = _pref(tiny_llama, tiny_embedder).score(["Say hi."] * 2, ["", None], ["Hi!", ""], progress=False)  # type: ignore[list-item]
    assert df["quality_score"].iloc[1] == EMPTY_SCORE < df["quality_score"].iloc[0]


def test_preference_empty_block_has_every_column(tiny_llama: Path, tiny_embedder: Path) -> None:
    # Necessity with nothing left to answer sends an empty block: columns as for one row.
    scorer = _pref(tiny_llama, tiny_embedder)
    empty = scorer.score([], [], [], progress=False)
    one = scorer.score(INS[:1], INP[:1], OUT[:1], progress=False)
    assert len(empty) == 0 and list(empty.columns) == list(one.columns)


def test_judge_question_leaves_log_probs_unchanged(tiny_llama: Path) -> None:
    cfg = ScorerConfig(kind="likelihood", model=str(tiny_llama), device="cpu", precision="float32", max_length=256, batch_size=2)
    plain = LikelihoodScorer(cfg).features(INS, INP, OUT, progress=False)
    judged_scorer = LikelihoodScorer(cfg, judge_question=JUDGE_QUESTION)
    assert judged_scorer.tokenizer.decode(judged_scorer.judge_ids).count("correct, complete and helpful") == 1
    judged = judged_scorer.features(INS, INP, OUT, progress=False)
    cols = ["lp_answer", "lp_answer_neutral", "lp_end"]
    np.testing.assert_allclose(judged[cols].to_numpy(), plain[cols].to_numpy(), atol=1e-4)
    assert np.isfinite(judged["judge"]).all() and "judge" not in plain.columns
    assert judged["judge"].nunique() > 1  # read per row, not a constant


def test_head_uses_fixed_statistics_not_the_batch(tiny_llama: Path, tiny_embedder: Path) -> None:
    head = PreferenceHead(features=["lp_answer", "copy_input"], mean=[-5.0, 0.0], scale=[2.0, 0.5], weights=[1.0, -2.0])
    df = _pref(tiny_llama, tiny_embedder, head=head).score(INS, INP, OUT, progress=False)
    expected = (df["lp_answer"] + 5.0) / 2.0 - 2.0 * df["copy_input"] / 0.5
    np.testing.assert_allclose(df["quality_score"], expected, atol=1e-9)
    with pytest.raises(ValueError, match="needs features"):
        PreferenceHead(features=["nope"], mean=[0.0], scale=[1.0], weights=[1.0]).apply(df)


def test_preference_fingerprint_names_both_models_and_the_head(tiny_llama: Path, tiny_embedder: Path) -> None:
    fp = _pref(tiny_llama, tiny_embedder).fingerprint()
    assert fp["kind"] == "preference" and fp["model_hash"] and fp["embedding_model_hash"] and fp["head"]
    other = PreferenceHead(features=["lp_answer"], mean=[0.0], scale=[1.0], weights=[1.0])
    assert _pref(tiny_llama, tiny_embedder, head=other).fingerprint()["head"] != fp["head"]


def test_text_features_known_values() -> None:
    echo = text_features("Rewrite it.", "the cat sat on the mat today", "the cat sat on the mat today")
    assert echo["copy_input"] == 1.0
    loop = text_features("Say something.", "", "I like it. " * 20)
    assert loop["repeated_trigrams"] > 0.8 and loop["distinct_words"] < 0.2
    fresh = text_features("Name fruits.", "", "1. Apple\n2. Banana\n3. Cherry")
    assert fresh["list_lines"] == 1.0 and fresh["repeated_trigrams"] == 0.0 and fresh["copy_input"] == 0.0
    assert text_features("Do it.", "", "I'm sorry, I cannot do that.")["refusal"] == 1.0
    assert text_features("Do it.", "", "Done")["ends_sentence"] == 0.0
    assert text_features("Do it.", "", "")["distinct_words"] == 0.0  # empty: no division by zero


@pytest.mark.flow
def test_pipeline_quality_and_necessity_with_preference_scorer(prefect_harness, tiny_llama_dir: Path,
                                                               tiny_embedder: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_helpers import tiny_config

    import mods.generation.answers
    from flows.mods_pipeline import mods_pipeline
    from mods.config import PipelineConfig

    real_generate = mods.generation.answers.generate_answers

    def generate_with_text(model, tokenizer, instructions, inputs, config, progress=True, contexts=None):
        # The tiny random seed model answers with newlines only (stripped to ""), and every
        # empty answer gets the same fixed score; give each row some text of its own so the
        # necessity stage has answers to score.
        answers = real_generate(model, tokenizer, instructions, inputs, config, progress=progress, contexts=contexts)
        return [a or f"Some words on {ins.lower()}" for a, ins in zip(answers, instructions)]

    monkeypatch.setattr(mods.generation.answers, "generate_answers", generate_with_text)
    values = tiny_config(tmp_path, tiny_llama_dir).model_dump(mode="json")
    values["quality"]["scorer"].update({"kind": "preference", "embedding_model": str(tiny_embedder)})
    config = PipelineConfig.model_validate(values)
    state = mods_pipeline(config=config, return_state=True)
    assert state.is_completed(), state.message

    artifacts = Path(config.workspace) / "artifacts"

    def table(stage: str, name: str) -> pd.DataFrame:
        (folder,) = [p for p in (artifacts / stage).iterdir() if not p.name.startswith(".")]
        return pd.read_parquet(folder / name)

    scores = table("quality", "scores.parquet")
    assert len(scores) == 40 and np.isfinite(scores["quality_score"]).all()
    assert scores["quality_score"].nunique() > 1
    necessity = table("necessity", "necessity.parquet")
    answers = table("answers", "answers.parquet").set_index("id").loc[necessity["id"]]
    assert len(necessity) > 0 and np.isfinite(necessity["necessity_score"]).all()
    # The necessity stage scored the seed model's answers with the preference scorer.
    direct = build_scorer(config.quality.scorer).score(
        answers["instruction"].tolist(), answers["input"].tolist(), answers["seed_answer"].tolist(), progress=False
    )["quality_score"].to_numpy()
    # (to batching noise: the stage scores blocks of batch_size rows, this call all rows at once)
    np.testing.assert_allclose(necessity["necessity_score"].to_numpy(), direct, atol=2e-3)
    assert necessity["necessity_score"].nunique() > 1


class _LengthScorer:
    """Scores an answer by its length plus the number of messages before its user turn."""

    def score(self, instructions, inputs, outputs, progress=True, contexts=None):
        before = contexts or [[] for _ in outputs]
        return pd.DataFrame({"quality_score": [float(len(o) + len(c)) for o, c in zip(outputs, before)],
                             "flag": [len(o) > 3 for o in outputs], "answer_tokens": [len(o) for o in outputs]})


@pytest.mark.parametrize(("aggregate", "expected"), [("mean", (5 + 7 + 10) / 3), ("min", 5.0), ("last", 10.0)])
def test_score_rows_scores_every_turn_and_combines_them(aggregate: str, expected: float) -> None:
    from mods.data.conversations import WHOLE_CONVERSATION, dumps
    from mods.scoring.scorers import score_rows

    conversation = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "abcde"},
                    {"role": "user", "content": "u2"}, {"role": "assistant", "content": "abcde"},
                    {"role": "user", "content": "u3"}, {"role": "assistant", "content": "abcdef"}]
    rows = pd.DataFrame({"instruction": ["u1", "Solo"], "input": ["", "ctx"], "output": ["abcde", "yes"],
                         "history": ["[]", "[]"], "metadata": [json.dumps({WHOLE_CONVERSATION: True}), "{}"],
                         "messages": [dumps(conversation), ""]})
    scored = score_rows(_LengthScorer(), rows, aggregate=aggregate)  # type: ignore[arg-type]
    # Turn k is scored after the 2k messages before it: 5 + 0, 5 + 2, 6 + 4.
    assert scored["turn_scores"].tolist() == [[5.0, 7.0, 10.0], [3.0]]
    assert scored["quality_score"].tolist() == [pytest.approx(expected), 3.0]
    assert scored["flag"].tolist() == [True, False] and scored["answer_tokens"].tolist() == [pytest.approx(16 / 3), 3]
    # The seed model's answers in place of the pool's: one per turn, the context stays the pool's.
    seed = score_rows(_LengthScorer(), rows, turn_answers=[["a", "bb", "ccc"], ["dddd"]], aggregate="min")  # type: ignore[arg-type]
    assert seed["turn_scores"].tolist() == [[1.0, 4.0, 7.0], [4.0]] and seed["quality_score"].tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="2 answers for a row of 3 turns"):
        score_rows(_LengthScorer(), rows, turn_answers=[["a", "b"], ["c"]])  # type: ignore[arg-type]
