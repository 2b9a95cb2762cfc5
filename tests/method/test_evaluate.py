"""The evaluation: test-set reading, baselines, judges, their agreement with people, the flow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# --- counting the paper's way -------------------------------------------------------------------


def test_paper_counting_table():
    from mods.evaluation.judges import paper_outcome

    # (A first: scores A, B), (B first: scores B, A)
    assert paper_outcome((8, 5), (5, 8)) == "win"      # A wins both orders
    assert paper_outcome((8, 5), (6, 6)) == "win"      # wins one, ties the other
    assert paper_outcome((6, 6), (6, 6)) == "tie"
    assert paper_outcome((8, 5), (8, 5)) == "tie"      # each model wins in the order it was shown first
    assert paper_outcome((5, 8), (6, 6)) == "lose"
    assert paper_outcome((5, 8), (8, 5)) == "lose"
    assert paper_outcome(None, (5, 8)) == "win"        # an unreadable review counts as a tie for that order
    assert paper_outcome(None, None) == "tie"


def test_order_swapping_cancels_a_judge_that_always_prefers_the_first_answer():
    from mods.evaluation.judges import count_outcomes, judge_both_orders

    questions = [f"q{i}" for i in range(7)]
    a = ["short", "a much longer answer", "same", "x", "yy yy", "a b c", "zz"]
    b = ["a longer answer here", "b", "same", "x y", "y", "a b", "z z z"]

    def always_first(qs, firsts, seconds):
        return [(9.0, 2.0) for _ in qs]

    judged = judge_both_orders(questions, a, b, always_first)
    counts = count_outcomes(judged["outcome"].tolist())
    assert counts == {"win": 0, "tie": 7, "lose": 0}

    # A judge with a real preference keeps it through the swap: the longer answer wins.
    def longer_wins(qs, firsts, seconds):
        return [(float(len(f)), float(len(s))) for f, s in zip(firsts, seconds)]

    judged = judge_both_orders(questions, a, b, longer_wins)
    expected = ["win" if len(x) > len(y) else "lose" if len(x) < len(y) else "tie" for x, y in zip(a, b)]
    assert judged["outcome"].tolist() == expected
    counts = count_outcomes(judged["outcome"].tolist())
    assert sum(counts.values()) == len(questions)


def test_scorer_outcomes_use_the_tie_margin():
    from mods.evaluation.judges import scorer_outcomes

    assert scorer_outcomes([1.0, 1.0, 1.0, np.nan], [0.5, 0.95, 1.5, 0.0], tie_margin=0.1) == ["win", "tie", "lose", "tie"]
    assert scorer_outcomes([1.0], [0.95], tie_margin=0.0) == ["win"]


def test_judge_agreement_on_pairs_with_a_known_answer():
    from mods.evaluation.judges import judge_agreement

    # people: A, B, A, B; judge: A right, B right, tie (half), A wrong
    result = judge_agreement(["win", "lose", "tie", "win"], [0, 1, 0, 1])
    assert result["pairs"] == 4
    assert result["agreement"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert result["agreement_decided"] == pytest.approx(2 / 3)
    assert result["tie_rate"] == pytest.approx(0.25)
    # A judge that calls every pair a tie sits at a coin's 50%, never above.
    assert judge_agreement(["tie"] * 5, [0, 1, 1, 0, 1])["agreement"] == pytest.approx(0.5)


def test_wilson_interval_and_sign_test():
    from mods.evaluation.statistics import sign_test_p, wilson_interval

    low, high = wilson_interval(32, 64)
    assert low < 0.5 < high and high - low == pytest.approx(0.24, abs=0.01)
    assert sign_test_p(5, 5) == 1.0
    assert sign_test_p(10, 0) == pytest.approx(2 / 2**10)
    assert sign_test_p(0, 0) is None


# --- baselines ------------------------------------------------------------------------------------


def _run_tables(n_pool: int = 40, n_hq: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"r{i:03d}" for i in range(n_pool)]
    sample = pd.DataFrame({"id": ids, "instruction": [f"task {i}" for i in range(n_pool)], "input": "",
                           "output": [f"answer {i}" for i in range(n_pool)]})
    scores = pd.DataFrame({"id": ids, "quality_score": rng.normal(size=n_pool)})
    top = scores.sort_values("quality_score", ascending=False)["id"][:n_hq]
    high_quality = sample[sample["id"].isin(top)].reset_index(drop=True)
    vectors = rng.normal(size=(n_hq, 8)).astype(np.float32)
    return sample, scores, high_quality, (high_quality["id"].tolist(), vectors)


@pytest.mark.parametrize("name", ["random", "quality_top", "seed_only"])
def test_baselines_have_exactly_the_selections_size(name):
    from mods.evaluation.runs import baseline_rows

    sample, scores, high_quality, embeddings = _run_tables()
    rows = baseline_rows(name, 10, sample, scores, high_quality, embeddings, seed=3, kcenter_seed=0)
    assert len(rows) == 10 and rows["id"].is_unique
    assert {"instruction", "input", "output"} <= set(rows.columns)
    if name == "random":
        assert set(rows["id"]) <= set(sample["id"])
        again = baseline_rows(name, 10, sample, scores, high_quality, embeddings, seed=3)
        assert again["id"].tolist() == rows["id"].tolist()  # seeded
    if name == "quality_top":
        best = scores.sort_values("quality_score", ascending=False)["id"][:10]
        assert set(rows["id"]) == set(best)
    if name == "seed_only":
        from mods.selection.kcenter import k_center_greedy

        ids, vectors = embeddings
        seed_set = [ids[i] for i in k_center_greedy(vectors, 4, seed=0).indices]
        assert rows["id"].tolist()[:4] == seed_set  # it starts as the run's seed set did
        assert set(rows["id"]) <= set(high_quality["id"])


def test_full_baseline_is_every_high_quality_row_and_bad_sizes_are_errors():
    from mods.evaluation.runs import baseline_rows

    sample, scores, high_quality, embeddings = _run_tables()
    assert len(baseline_rows("full", 10, sample, scores, high_quality, embeddings, seed=0)) == len(high_quality)
    with pytest.raises(ValueError, match="sampled pool has 40"):
        baseline_rows("random", 41, sample, scores, high_quality, embeddings, seed=0)
    with pytest.raises(ValueError, match="empty"):
        baseline_rows("quality_top", 0, sample, scores, high_quality, embeddings, seed=0)


# --- test sets --------------------------------------------------------------------------------------


def test_the_papers_five_test_sets_read_through_the_readers(shared_data: Path):
    from mods.evaluation.testsets import PAPER_TEST_SETS, find_test_sets, read_test_set

    counts = {}
    for name, path, references in find_test_sets(shared_data / "testsets", list(PAPER_TEST_SETS)):
        read = read_test_set(path, name, references)
        counts[name] = (len(read.rows), int(read.rows["reference"].notna().sum()))
        assert read.rows["prompt_id"].is_unique and (read.rows["instruction"].str.len() > 0).all()
    assert counts == {"koala": (180, 0), "wizardlm": (218, 0), "selfinstruct": (252, 252), "vicuna": (80, 10),
                      "lima": (300, 0)}


def test_user_test_files_of_several_shapes(tmp_path: Path):
    from mods.evaluation.testsets import PromptFileError, find_test_sets, read_test_set, sample_prompts

    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"id": "a", "prompt": "Name a colour."}),
        json.dumps({"question": "What is 2+2?", "answer": "4"}),
        json.dumps({"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}),
        json.dumps({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}),
        json.dumps({"label": "no prompt here"}),
        "{not json",
    ]) + "\n")
    read = read_test_set(jsonl)
    assert read.rows["instruction"].tolist() == ["Name a colour.", "What is 2+2?", "Say hi.", "Translate."]
    assert read.rows["reference"].tolist()[1] == "4" and read.rows["input"].tolist()[3] == "Bonjour"
    assert read.skipped == {"no_prompt": 1, "unparseable": 1}
    csv = tmp_path / "more.csv"
    csv.write_text("instruction,reference\nWrite a haiku.,Old pond\nCount to three.,1 2 3\n")
    chosen = find_test_sets(tmp_path / "none", [], [str(jsonl), str(csv)])
    assert [name for name, _, _ in chosen] == ["mine", "more"]
    assert read_test_set(csv).rows["reference"].tolist() == ["Old pond", "1 2 3"]

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"label": 1}) + "\n")
    with pytest.raises(PromptFileError, match="no test prompts found"):
        read_test_set(empty)
    with pytest.raises(PromptFileError, match="not found"):
        find_test_sets(tmp_path / "none", ["koala"])

    frame = pd.concat([read.rows, read_test_set(csv, "more").rows], ignore_index=True)
    drawn = sample_prompts(frame, per_set=2, reference_per_set=1, seed=5)
    assert drawn.groupby("test_set")["answer"].sum().to_dict() == {"mine": 2, "more": 2}
    assert drawn.groupby("test_set")["reference_loglik"].sum().to_dict() == {"mine": 1, "more": 1}
    assert drawn.loc[drawn["reference_loglik"], "reference"].notna().all()
    assert sample_prompts(frame, 2, 1, seed=5).equals(drawn)


# --- models: the LLM judge and reference likelihood on a tiny model ----------------------------------


def test_llm_judge_always_reads_two_scores_from_a_tiny_model(tiny_llama_dir: Path):
    from mods.evaluation.judges import LLMJudge, LLMJudgeConfig, llm_judge_pairs

    judge = LLMJudge(LLMJudgeConfig(model=str(tiny_llama_dir), max_answer_tokens=32, max_question_tokens=32,
                                    batch_size=4, device="cpu"))
    scores = judge.rate(["What are the primary colors?"] * 3, ["red, blue, yellow", "", "x" * 200],
                        ["The three primary colors.", "green", "ok"])
    assert all(s is not None and 1 <= s[0] <= 10 and 1 <= s[1] <= 10 for s in scores)
    judged = llm_judge_pairs(judge, ["Give three tips.", "Add 2 and 3."], ["", ""], ["Eat well.", "5"], ["Sleep.", "6"])
    assert set(judged["outcome"]) <= {"win", "tie", "lose"} and len(judged) == 2


def test_reference_loglik_is_minus_the_training_loss(tiny_llama_dir: Path):
    import torch

    from mods.evaluation.answering import reference_loglik
    from mods.models.loading import load_causal_lm
    from mods.training.data import collate, encode_rows

    model, tokenizer = load_causal_lm(tiny_llama_dir, device="cpu")
    frame = pd.DataFrame({"instruction": ["Compute 12 + 7 * 3.", "Name a fruit."], "input": ["", "one only"],
                          "reference": ["The answer is 33.", "apple"]})
    values = reference_loglik(model, tokenizer, frame, max_length=64, batch_size=2)
    for i in range(2):
        row = pd.DataFrame({"instruction": [frame["instruction"][i]], "input": [frame["input"][i]],
                            "output": [frame["reference"][i]]})
        batch = collate(encode_rows(tokenizer, row, 64), tokenizer.pad_token_id)
        with torch.inference_mode():
            loss = model(**batch).loss.item()
        assert values[i] == pytest.approx(-loss, rel=1e-4)


# --- the report -------------------------------------------------------------------------------------


def _document(agreement: float, scorer_agreement: dict | None = None, caveats: tuple = (), **extra: object):
    from mods.evaluation.report import evaluation_document
    from mods.evaluation.statistics import comparison_rows

    judged = pd.DataFrame({"test_set": ["koala"] * 3 + ["lima"] * 2, "outcome": ["win", "tie", "lose", "win", "win"]})
    comparisons = comparison_rows("scorer", "mods", "random", judged, ["koala", "lima"])
    return evaluation_document(["scorer"], comparisons, {"vicuna": {"prompts": 2, "mods": -1.5, "random": -1.7}},
                               {"scorer": {"pairs": 64, "of_pairs": 742, "agreement": agreement, "ci95": [0.4, 0.6],
                                           "tie_rate": 0.1, "length_only": 0.7, "model": "likelihood", **extra}},
                               0.6, {"selection_size": 32, "export_key": "abc"}, scorer_agreement, caveats)


def test_a_judge_fitted_on_the_human_pairs_is_trusted_on_its_cross_validated_figure(tmp_path: Path):
    from mods.config import ScorerConfig
    from mods.evaluation.head_fit import fitted_on_these_pairs
    from mods.core.files import REPORT_MD
    from mods.evaluation.report import write_outputs
    from mods.evaluation.config import AgreementParams

    # The shipped preference head names the PandaLM file it was fitted on, with its CV figures.
    params = AgreementParams(judge="scorer", scorer=ScorerConfig(kind="preference"),
                             preferences="/anywhere/pandalm_testset_v1.json")
    held_out = fitted_on_these_pairs(params)
    assert held_out is not None and 0.5 < held_out["human_agreement"] < 1
    other = params.model_copy(update={"preferences": "/mine/my_pairs.json"})
    assert fitted_on_these_pairs(other) is None
    assert fitted_on_these_pairs(params.model_copy(update={"scorer": ScorerConfig(kind="likelihood")})) is None

    # 80% in-sample but 55% cross-validated: not trusted, and the report says why.
    doc = _document(0.80, in_sample=True, held_out_agreement=0.55, held_out_note="fitted on X; cross-validated 55%")
    assert doc["judge_agreement"]["scorer"]["trusted"] is False
    write_outputs(tmp_path, doc)
    report = (tmp_path / REPORT_MD).read_text()
    assert "In-sample (scorer judge):" in report and "cross-validated 55%" in report and "No verdict" in report
    assert _document(0.80, in_sample=True, held_out_agreement=0.7, held_out_note="n")["judge_agreement"]["scorer"]["trusted"]


def test_only_the_scorer_the_head_was_fitted_with_is_trusted_on_its_cross_validated_figure(tiny_llama_dir: Path):
    from mods.config import ScorerConfig
    from mods.evaluation.head_fit import fitted_on_these_pairs, head_fit_differences
    from mods.models.loading import PREPARED_MARKER, default_cache_dir, smollm2_path
    from mods.scoring.preference import PreferenceHead, load_preference_head
    from mods.evaluation.config import AgreementParams

    def params(**scorer: object) -> AgreementParams:
        return AgreementParams(judge="scorer", scorer=ScorerConfig(kind="preference", **scorer),
                               preferences="/anywhere/pandalm_testset_v1.json")

    # The fit's own scorer (benchmarks/quality_scorer.py --fit at its defaults), however it is named.
    assert fitted_on_these_pairs(params()) is not None
    assert fitted_on_these_pairs(params(model="smollm2-135m-instruct", device="cpu", batch_size=3)) is not None
    prepared = smollm2_path(default_cache_dir())
    if (prepared / PREPARED_MARKER).exists():  # the same files in a folder are the same model
        assert fitted_on_these_pairs(params(model=str(prepared))) is not None
    # Another LM, another embedding model or another max_length: measured, not trusted on the head's figure.
    assert head_fit_differences(ScorerConfig(kind="preference", model=str(tiny_llama_dir))) == ["model"]
    assert fitted_on_these_pairs(params(model=str(tiny_llama_dir))) is None
    assert head_fit_differences(ScorerConfig(kind="preference", embedding_model=str(tiny_llama_dir))) == ["embedding_model"]
    assert fitted_on_these_pairs(params(embedding_model=str(tiny_llama_dir))) is None
    assert head_fit_differences(ScorerConfig(kind="preference", max_length=256)) == ["max_length"]
    assert fitted_on_these_pairs(params(max_length=256)) is None
    # A head that records the scorer it was fitted with is compared with that record.
    shipped = load_preference_head()
    recorded = PreferenceHead.model_validate({**shipped.model_dump(), "scorer": {"max_length": 256}})
    assert fitted_on_these_pairs(params(), head=recorded) is None
    assert fitted_on_these_pairs(params(max_length=256), head=recorded) is not None


def test_every_agreement_figure_says_which_pairs_and_the_caveats_are_in_the_report(tmp_path: Path):
    from mods.config import ScorerConfig
    from mods.core.files import REPORT_MD
    from mods.evaluation.report import agreement_phrase, scorer_caveats, write_outputs

    preference, likelihood = ScorerConfig(kind="preference"), ScorerConfig(kind="likelihood")
    caveats = scorer_caveats(["scorer"], preference, preference.model_copy(update={"device": "cpu"}),
                             ["koala", "selfinstruct"])
    assert len(caveats) == 2
    assert "biased toward MoDS and quality_top" in caveats[0] and "not independent" in caveats[0]
    assert "Self-instruct test set" in caveats[1] and "`selfinstruct` is one of the test sets here" in caveats[1]
    # A scorer judge that is not the pipeline's scorer took no part in the selection.
    assert not any("biased" in c for c in scorer_caveats(["scorer"], likelihood, preference, ["koala"]))
    assert scorer_caveats(["llm"], None, likelihood, ["selfinstruct"]) == []
    assert agreement_phrase({"agreement": 0.5, "pairs": 742, "of_pairs": 742}) == "50% human agreement on all 742 pairs"

    scorer = {"judge": "scorer", "model": "preference: smollm2-135m-instruct", "pairs": 64, "of_pairs": 742,
              "agreement": 0.55, "ci95": [0.43, 0.67], "length_only": 0.7, "same_as_scorer_judge": False}
    write_outputs(tmp_path, _document(0.48, scorer_agreement=scorer, caveats=tuple(caveats)))
    report = (tmp_path / REPORT_MD).read_text()
    figures = [line for line in report.splitlines() if "human agreement" in line or line.startswith("| scorer judge")
               or line.startswith("| the pipeline")]
    assert len(figures) >= 4
    for line in figures:  # wherever a figure is given, it says on how many of the 742 pairs
        assert "64 of the 742 pairs (seeded sample)" in line, line
    assert "**The pipeline's quality scorer**" in report and "55% human agreement on 64 of the 742 pairs" in report
    assert "## Caveats" in report and "biased toward MoDS" in report and "Self-instruct" in report
    assert "No judge in this evaluation reaches 60%" in report


def test_prefect_artifact_contents_table_full_report_and_chart(tmp_path: Path):
    from mods.core.files import EVALUATION_PNG
    from mods.evaluation.report import CHART_WIDTH_PX, prefect_artifact_contents, write_outputs

    doc = _document(0.48)
    write_outputs(tmp_path, doc)
    contents = prefect_artifact_contents(tmp_path)
    assert contents["table"] == doc["comparisons"]
    report = contents["report"]
    assert "48% human agreement on 64 of the 742 pairs (seeded sample)" in report and "No verdict" in report
    assert "## Reference answers: mean per-token log-likelihood" in report and "| vicuna | 2 | -1.500 | -1.700 |" in report
    assert f"on disk at `{tmp_path}`" in report
    png = (tmp_path / EVALUATION_PNG).stat().st_size
    assert png <= 100_000  # the test chart is small: inlined, at a fixed width
    assert contents["chart"].startswith('<img src="data:image/png;base64,') and f'width="{CHART_WIDTH_PX}"' in contents["chart"]
    large = prefect_artifact_contents(tmp_path, max_inline_png=png - 1)["chart"]
    assert "data:image" not in large and f"is on disk at `{tmp_path / EVALUATION_PNG}`" in large
    (tmp_path / EVALUATION_PNG).unlink()
    assert "missing" in prefect_artifact_contents(tmp_path)["chart"]  # never skipped silently


def test_the_command_prints_where_the_outputs_are_and_states_distrust_plainly(tmp_path: Path):
    from flows.cli_evaluate import summary_lines
    from mods.core.files import EVALUATION_JSON, EVALUATION_PNG, REPORT_MD
    from mods.evaluation.report import write_outputs

    write_outputs(tmp_path, _document(0.48, scorer_agreement={"pairs": 64, "of_pairs": 742, "agreement": 0.52}))
    result = {"evaluation_json": str(tmp_path / EVALUATION_JSON), "chart": str(tmp_path / EVALUATION_PNG),
              "report": str(tmp_path / REPORT_MD)}
    text = "\n".join(summary_lines(json.loads((tmp_path / EVALUATION_JSON).read_text()), result))
    for label, key in (("table (JSON):", "evaluation_json"), ("chart:", "chart"), ("report:", "report")):
        line = next(line for line in text.splitlines() if line.strip().startswith(label))
        assert line.split(":", 1)[1].strip() == result[key] and Path(result[key]).is_file()
    assert "scorer judge: 48% human agreement on 64 of the 742 pairs (seeded sample)" in text
    assert "NOT TRUSTWORTHY: below 60% agreement with people" in text
    assert "this evaluation does not say whether the selection helps" in text
    assert "pipeline quality scorer: 52% human agreement on 64 of the 742 pairs (seeded sample); below 60%" in text
    trusted = "\n".join(summary_lines(_document(0.75)))
    assert "usable (at least 60%)" in trusted and "NOT TRUSTWORTHY" not in trusted and "does not say" not in trusted


def test_evaluation_json_shape_and_the_trust_statement(tmp_path: Path):
    from mods.core.files import EVALUATION_JSON, EVALUATION_PNG, REPORT_MD
    from mods.evaluation.report import write_outputs

    doc = _document(0.48)
    assert doc["judge"] == "scorer"
    assert doc["comparisons"][0] == {"a": "mods", "b": "random", "test_set": "koala", "win": 1, "tie": 1, "lose": 1,
                                     "judge": "scorer"}
    assert sum(doc["comparisons"][1][k] for k in ("win", "tie", "lose")) == 2
    write_outputs(tmp_path, doc)
    report = (tmp_path / REPORT_MD).read_text()
    assert "No verdict" in report and "**not trustworthy** |" in report and "(not trustworthy)" in report
    assert json.loads((tmp_path / EVALUATION_JSON).read_text())["judge_agreement"]["scorer"]["trusted"] is False
    assert (tmp_path / EVALUATION_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    trusted = tmp_path / "trusted"
    trusted.mkdir()
    write_outputs(trusted, _document(0.75))
    report = (trusted / REPORT_MD).read_text()
    assert "No verdict" not in report and "| usable |" in report and "(not trustworthy)" not in report


def test_cli_config_sections_and_overrides(tmp_path: Path):
    from flows.cli_evaluate import EvaluateUsageError, load_evaluation_config

    config_file = tmp_path / "run.yaml"
    config_file.write_text("workspace: elsewhere\nsample: {rows: 10}\nevaluation:\n  prompts_per_set: 3\n")
    workspace, config = load_evaluation_config(str(config_file), ["evaluation.judge=[llm]", "tie_margin=0.5"], None)
    assert workspace == "elsewhere" and config.prompts_per_set == 3 and config.judge == ["llm"]
    assert config.tie_margin == 0.5
    # One file for both commands: `mods run` reads the same file, evaluation section included.
    from mods.config import load_config
    pipeline = load_config(config_file)
    assert pipeline.sample.rows == 10 and pipeline.evaluation.prompts_per_set == 3
    with pytest.raises(ValueError, match="evaluation"):
        config_file.write_text("evaluation:\n  prompts_per_sett: 3\n")
        load_config(config_file)
    assert load_evaluation_config(None, [], "ws2")[0] == "ws2"
    with pytest.raises(EvaluateUsageError, match="evaluation.baselines"):
        load_evaluation_config(None, ["baselines=[best]"], None)


# --- the flow: baselines, answers, judges, report, and a rerun that executes nothing -----------------


def _preference_file(path: Path) -> Path:
    records = []
    for i in range(6):
        longer, shorter = f"A full answer number {i} with details.", f"Short {i}."
        vote = 1 if i % 2 == 0 else 2
        records.append({"idx": i, "instruction": f"Explain thing {i}.", "input": "",
                        "response1": longer if vote == 1 else shorter, "response2": shorter if vote == 1 else longer,
                        "annotator1": vote, "annotator2": vote, "annotator3": vote, "cmp_key": "x_y"})
    records.append({"idx": 6, "instruction": "Tie.", "input": "", "response1": "a", "response2": "b",
                    "annotator1": 0, "annotator2": 0, "annotator3": 0})
    path.write_text(json.dumps(records))
    return path


@pytest.mark.flow
def test_evaluation_flow_counts_sizes_and_rerun(prefect_harness, tiny_llama_dir: Path, tmp_path: Path, capsys):
    from pipeline_helpers import task_states, tiny_config

    from flows.evaluate import mods_evaluate
    from flows.mods_pipeline import mods_pipeline
    from mods.config import EvaluationConfig

    config = tiny_config(tmp_path, tiny_llama_dir)
    assert mods_pipeline(config=config, return_state=True).is_completed()
    workspace = Path(config.workspace)

    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "alpha.jsonl").write_text("\n".join(json.dumps({"id": i, "prompt": f"Tell me about {t}."})
                                                 for i, t in enumerate(["owls", "tea", "rain", "maps"])) + "\n")
    (tests / "beta.jsonl").write_text("\n".join(json.dumps({"instruction": f"Sum {i} and 2.", "output": f"{i + 2}"})
                                                for i in range(3)) + "\n")
    evaluation = EvaluationConfig.model_validate({
        "test_sets": [], "test_files": [str(tests / "alpha.jsonl"), str(tests / "beta.jsonl")],
        "prompts_per_set": 3, "reference_rows_per_set": 2,
        "judge": ["scorer", "llm"],
        "llm_judge": {"model": str(tiny_llama_dir), "max_answer_tokens": 16, "max_question_tokens": 16, "device": "cpu"},
        "generation": {"max_new_tokens": 4, "batch_size": 4, "device": "cpu"},
        # Named like PandaLM's file, which the shipped head was fitted on: the run's scorer (a tiny LM,
        # max_length 64) is not the head's fit, so it is measured, not trusted on the head's figure.
        "reference_max_length": 64, "preferences": str(_preference_file(tmp_path / "pandalm_testset_v1.json")),
        "agreement_pairs": None, "progress": False,
    })
    cold = mods_evaluate(workspace=str(workspace), config=evaluation, return_state=True)
    assert cold.is_completed(), cold.message
    result = cold.result()
    document = json.loads(Path(result["evaluation_json"]).read_text())
    assert Path(result["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(result["report"]).is_file()

    # Every (judge, baseline, test set): win + tie + lose = the prompts judged there.
    assert len(document["comparisons"]) == 2 * 3 * 2
    for row in document["comparisons"]:
        assert row["win"] + row["tie"] + row["lose"] == 3
    assert set(document["judge_agreement"]) == {"scorer", "llm"}
    assert document["judge_agreement"]["scorer"]["pairs"] == 6
    assert document["reference_loglik"]["beta"]["prompts"] == 2
    scorer_judge = document["judge_agreement"]["scorer"]
    assert not scorer_judge.get("in_sample") and {"model", "max_length"} <= set(scorer_judge["head_fit_differs"])
    # The pipeline's own scorer against people: the scorer judge's stage, reused (one agreement stage per judge).
    assert document["scorer_agreement"]["same_as_scorer_judge"] is True
    assert document["scorer_agreement"]["agreement"] == scorer_judge["agreement"]
    assert len(list((workspace / "artifacts" / "evaluate_agreement").glob("[!.]*"))) == 2
    report = Path(result["report"]).read_text()
    assert str(workspace) not in report and str(tmp_path) not in report
    assert "## Caveats" in report and "biased toward MoDS and quality_top" in report
    assert "Not the head's fit (scorer judge)" in report and "on all 6 pairs" in report

    # Baselines are trained on exactly the selection's size (seed 4 + augmented 3).
    selection = pd.read_parquet(next((workspace / "artifacts" / "export").glob("[!.]*")) / "selected.parquet")
    for folder in (workspace / "artifacts" / "evaluate_baseline").glob("[!.]*"):
        assert len(pd.read_parquet(folder / "selected.parquet")) == len(selection) == 7
    assert len(list((workspace / "artifacts" / "evaluate_baseline").glob("[!.]*"))) == 3

    artifacts_before = sorted(p.relative_to(workspace) for p in (workspace / "artifacts").glob("*/[!.]*"))
    warm = mods_evaluate(workspace=str(workspace), config=evaluation, return_state=True)
    assert warm.is_completed()
    assert warm.result()["executed"] == []
    assert set(task_states(warm).values()) == {"Cached"}  # waits for states recorded late
    assert sorted(p.relative_to(workspace) for p in (workspace / "artifacts").glob("*/[!.]*")) == artifacts_before
    assert warm.result()["evaluation_json"] == result["evaluation_json"]

    # A copied workspace reruns nothing, the report included (no workspace path in any key),
    # and the command prints where the three outputs are, in the copy.
    import argparse
    import shutil

    import yaml

    from flows.cli_evaluate import handle_evaluate

    moved = tmp_path / "moved"
    shutil.copytree(workspace, moved)
    config_file = tmp_path / "evaluation.yaml"
    config_file.write_text(yaml.safe_dump({"evaluation": evaluation.model_dump(mode="json")}))
    capsys.readouterr()
    assert handle_evaluate(argparse.Namespace(config=str(config_file), set=[], workspace=str(moved), quiet=True)) == 0
    printed = capsys.readouterr().out
    paths = {label: line.split(":", 1)[1].strip() for line in printed.splitlines()
             for label in ("table (JSON)", "chart", "report") if line.strip().startswith(label + ":")}
    assert set(paths) == {"table (JSON)", "chart", "report"}
    for path in paths.values():
        assert Path(path).is_file() and Path(path).is_relative_to(moved)
    assert Path(paths["report"]).parent.name == Path(result["report"]).parent.name  # the same report key
    assert sorted(p.relative_to(moved) for p in (moved / "artifacts").glob("*/[!.]*")) == artifacts_before
    assert "scorer judge: " in printed and "llm judge: " in printed and "pipeline quality scorer: " in printed
