"""Selection beyond the paper (issue 20): IFD and reward-gap necessity, coverage methods within
row or token budgets and per-source caps, percentile cut-offs, and which stage keys a method
change touches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# --- IFD: two forward passes of the seed model, checked against a hand computation ------------------


def _rows() -> pd.DataFrame:
    return pd.DataFrame({
        "instruction": ["What are the three primary colors?", "Compute 12 + 7 * 3.", "List five fruits."],
        "input": ["", "", "Audience: children"],
        "output": ["The three primary colors are red, blue and yellow.", "The answer is 33.",
                   "apple, banana, cherry, mango, orange"],
    })


def _hand_loss(model, ids: list[int], scored: int) -> float:
    """transformers' own loss with every token but the last ``scored`` masked out."""
    labels = [-100] * (len(ids) - scored) + ids[len(ids) - scored:]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    return float(out.loss)


@pytest.mark.parametrize("with_bos", [True, False])
def test_ifd_equals_a_hand_computation(tiny_llama_dir: Path, with_bos: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mods.data.prompts import answer_suffix, chat_prompt
    from mods.scoring.ifd import ifd_scores

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    if not with_bos:
        tokenizer.bos_token = None
    assert (tokenizer.bos_token_id is not None) == with_bos
    rows = _rows()
    got = ifd_scores(model, tokenizer, rows, max_length=256)
    for i, row in rows.iterrows():
        prompt = tokenizer(chat_prompt(tokenizer, row["instruction"], row["input"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["output"] + answer_suffix(tokenizer), add_special_tokens=False)["input_ids"]
        if with_bos:
            alone, scored = [tokenizer.bos_token_id] + answer, len(answer)
        else:  # the answer's first token has no context alone: scored in neither pass
            alone, scored = answer, len(answer) - 1
        conditioned = _hand_loss(model, prompt + answer, scored)
        unconditioned = _hand_loss(model, alone, scored)
        assert got.loc[i, "loss_with_instruction"] == pytest.approx(conditioned, rel=1e-5)
        assert got.loc[i, "loss_answer_alone"] == pytest.approx(unconditioned, rel=1e-5)
        assert got.loc[i, "ifd"] == pytest.approx(conditioned / unconditioned, rel=1e-5)


def test_ifd_in_a_batch_equals_ifd_row_by_row(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mods.scoring.ifd import ifd_scores

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = _rows()
    batch = ifd_scores(model, tokenizer, rows, max_length=256)["ifd"].to_numpy()
    single = [ifd_scores(model, tokenizer, rows.iloc[[i]], max_length=256)["ifd"].iloc[0] for i in range(len(rows))]
    np.testing.assert_allclose(batch, single, rtol=1e-5)


# --- necessity scores per method and their cut-offs ----------------------------------------------


def test_reward_gap_ranks_rows_by_pool_score_minus_seed_answer_score():
    from mods.selection.cutoffs import keep_mask
    from mods.selection.thresholds import necessity_scores

    quality = pd.DataFrame({"id": ["a", "b", "c", "d"], "quality_score": [2.0, 0.5, 1.0, -1.0]})
    necessity = pd.DataFrame({"id": ["d", "c", "b", "a"], "necessity_score": [-3.0, 1.5, 0.0, 0.5]})
    scored, keep, set_aside = necessity_scores("reward_gap", necessity, quality, pd.DataFrame())
    gaps = dict(zip(scored["id"], scored["score"]))
    assert gaps == {"a": 1.5, "b": 0.5, "c": -0.5, "d": 2.0} and keep == "above" and set_aside == 0
    mask, cutoff = keep_mask(scored["score"].to_numpy(), keep, fraction=0.5)
    assert set(scored["id"][mask]) == {"d", "a"} and cutoff == 1.5  # the two largest gaps
    mask, _ = keep_mask(scored["score"].to_numpy(), keep, value=0.0)
    assert set(scored["id"][mask]) == {"a", "b", "d"}  # the seed model's answer is worse than the pool's
    # generate: low scores are needed (the paper)
    scored, keep, _ = necessity_scores("generate", necessity, quality, pd.DataFrame())
    mask, _ = keep_mask(scored["score"].to_numpy(), keep, fraction=0.5)
    assert keep == "below" and set(scored["id"][mask]) == {"d", "b"}


def test_ifd_above_one_is_set_aside_and_the_hardest_are_needed():
    from mods.selection.cutoffs import keep_mask
    from mods.selection.thresholds import necessity_scores

    ifd = pd.DataFrame({"id": list("abcde"), "ifd": [0.2, 1.3, 0.9, np.nan, 0.6]})
    scored, keep, set_aside = necessity_scores("ifd", pd.DataFrame(), pd.DataFrame(), ifd)
    assert scored["id"].tolist() == ["a", "c", "e"] and set_aside == 2 and keep == "above"
    mask, _ = keep_mask(scored["score"].to_numpy(), keep, fraction=0.34)
    assert scored["id"][mask].tolist() == ["c"]


def test_cutoffs_as_percentiles_and_their_distribution():
    from mods.selection.cutoffs import keep_mask, percentile_of, score_distribution

    scores = np.arange(1, 101, dtype=np.float64)
    mask, cutoff = keep_mask(scores, "above", percentile=40)
    assert cutoff == pytest.approx(np.percentile(scores, 40)) and mask.sum() == 60
    mask, cutoff = keep_mask(scores, "below", percentile=25)
    assert mask.sum() == 25 and cutoff == pytest.approx(25.75)
    assert percentile_of(scores, 30.0) == 30.0
    dist = score_distribution(scores, 40.6, "above", 60)
    assert dist["cutoff_percentile"] == 40.0 and sum(dist["histogram"]["counts"]) == 100
    assert dist["quantiles"]["p50"] == pytest.approx(50.5)


def test_alpha_and_beta_percentiles_are_validated_in_one_line():
    from pydantic import ValidationError

    from mods.config import PipelineConfig

    with pytest.raises(ValidationError, match="alpha or alpha_percentile, not both"):
        PipelineConfig.model_validate({"quality": {"alpha": 0.0, "alpha_percentile": 30}})
    with pytest.raises(ValidationError, match="beta or beta_percentile, not both"):
        PipelineConfig.model_validate({"necessity": {"beta": 0.0, "beta_percentile": 30}})
    with pytest.raises(ValidationError, match="less than or equal to 100"):
        PipelineConfig.model_validate({"necessity": {"beta_percentile": 130}})
    with pytest.raises(ValidationError, match="source_shares must lie in"):
        PipelineConfig.model_validate({"seed_selection": {"source_shares": {"a": 1.5}}})
    with pytest.raises(ValidationError, match="'generate', 'reward_gap' or 'ifd'"):
        PipelineConfig.model_validate({"necessity": {"method": "magic"}})


# --- coverage methods: deterministic, within budgets and caps --------------------------------------

METHODS = ["k_center", "kmeans_quality", "facility_location"]


def _candidates(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, 12)) * 4
    vectors = (centers[rng.integers(6, size=n)] + rng.normal(size=(n, 12))).astype(np.float32)
    vectors[5] = vectors[7]  # a duplicate instruction
    sources = np.array(["/d/alpaca52k/part-1.json", "/d/gsm8k.json", "/d/lima.json"])[rng.integers(3, size=n)]
    costs = rng.integers(20, 400, size=n)
    quality = rng.normal(size=n)
    return vectors, sources.tolist(), costs, quality


def _select(method, vectors, budget, quality, already=(), seed=3):
    from mods.selection.coverage_methods import CoverageConfig, select_rows

    return select_rows(CoverageConfig(method=method, clusters=8), vectors, budget, already, seed=seed, quality=quality)


@pytest.mark.parametrize("method", METHODS)
def test_a_coverage_method_is_deterministic_and_takes_exactly_k_rows(method):
    from mods.selection.budgets import make_budget

    vectors, sources, _, quality = _candidates()
    picks = [_select(method, vectors, make_budget("rows", 30, np.ones(400, int), sources, {}, {}), quality)
             for _ in range(2)]
    assert np.array_equal(picks[0], picks[1]) and len(picks[0]) == 30 == len(set(picks[0].tolist()))
    assert not {5, 7} <= set(picks[0].tolist())  # never both copies of a duplicate
    other_seed = _select(method, vectors, make_budget("rows", 30, np.ones(400, int), sources, {}, {}), quality, seed=4)
    assert len(other_seed) == 30
    # Seed rows already chosen are centers, never picked again.
    already = picks[0][:10].tolist()
    more = _select(method, vectors, make_budget("rows", 12, np.ones(400, int), sources, {}, {}), quality, already)
    assert len(more) == 12 and not set(more.tolist()) & set(already)


@pytest.mark.parametrize("method", METHODS)
def test_a_token_budget_and_source_caps_are_respected_exactly(method):
    from mods.selection.budgets import make_budget, source_groups

    vectors, sources, costs, quality = _candidates()
    caps, shares = {"gsm8k*": 1500}, {"alpaca52k": 0.4}
    budget = make_budget("tokens", 6000, costs, sources, caps, shares)
    picks = _select(method, vectors, budget, quality)
    spent = int(costs[picks].sum())
    assert spent <= 6000 and spent == 6000 - budget.left
    groups = source_groups(sources, ["gsm8k*", "alpaca52k"])
    assert costs[picks][groups[picks] == 0].sum() <= 1500
    assert costs[picks][groups[picks] == 1].sum() <= int(0.4 * 6000)
    assert (groups[picks] == -1).any()  # the uncapped source still gets rows
    # Nothing left out would still fit: the budget is used up to what the caps allow.
    left_out = np.setdiff1d(np.arange(400), np.append(picks, 5 if 7 in picks else 7))
    assert not budget.fits()[left_out].any()
    again = _select(method, vectors, make_budget("tokens", 6000, costs, sources, caps, shares), quality)
    assert np.array_equal(picks, again)


def test_row_caps_per_source_are_exact():
    from mods.selection.budgets import make_budget, source_groups

    vectors, sources, _, quality = _candidates()
    for method in METHODS:
        picks = _select(method, vectors, make_budget("rows", 40, np.ones(400, int), sources, {"lima.json": 5}, {}),
                        quality)
        groups = source_groups(sources, ["lima.json"])
        assert len(picks) == 40 and (groups[picks] == 0).sum() == 5


def test_k_center_within_a_plain_row_budget_is_the_papers_k_center():
    from mods.selection.budgets import make_budget
    from mods.selection.coverage_methods import pick_statistics
    from mods.selection.kcenter import k_center_greedy

    vectors, sources, _, quality = _candidates()
    vectors[5] += 1.0  # no duplicates here: k_center_greedy would pick none either
    picks = _select("k_center", vectors, make_budget("rows", 25, np.ones(400, int), sources, {}, {}), quality, seed=0)
    reference = k_center_greedy(vectors, 25, seed=0)
    assert np.array_equal(picks, reference.indices)
    distances, radii = pick_statistics(vectors, picks)
    np.testing.assert_allclose(radii, reference.radii, rtol=1e-5)
    np.testing.assert_allclose(distances[1:], reference.pick_distances[1:], rtol=1e-4)


def test_kmeans_quality_spreads_picks_over_clusters_and_prefers_quality():
    from mods.selection.budgets import make_budget
    from mods.selection.coverage_methods import kmeans_labels

    vectors, sources, _, quality = _candidates()
    labels = kmeans_labels(vectors, 6, seed=3, iterations=25)
    picks = _select("kmeans_quality", vectors, make_budget("rows", 60, np.ones(400, int), sources, {}, {}),
                    quality)
    sizes = np.bincount(labels, minlength=6)
    got = np.bincount(labels[picks], minlength=6)
    # Each of the six blobs gets picks in proportion to its size (±2 for the cluster split).
    assert np.all(np.abs(got - 60 * sizes / 400) <= 3)
    assert quality[picks].mean() > quality.mean()


# --- which stage keys a method changes ---------------------------------------------------------------


def _keys(overrides: dict) -> dict:
    from mods.config import PipelineConfig
    from mods.core.engine import key_params
    from mods.pipeline import stage_params

    return {name: key_params(p) for name, p in stage_params(PipelineConfig.model_validate(overrides), ["x"]).items()}


def test_defaults_keep_the_stage_parameters_of_earlier_keys():
    keys = _keys({})
    assert keys["seed_select"] == {"k": 16, "seed": 0}
    assert keys["high_quality"] == {"alpha": None, "keep_fraction": 0.6}
    assert keys["augment_select"] == {"beta": None, "fraction": 0.5, "k": 16, "relative_to_seed": True, "seed": 0}
    assert keys["answers"] == {"max_new_tokens": 64, "num_beams": 1, "batch_size": 16, "max_prompt_length": 256}


@pytest.mark.parametrize("overrides, changed", [
    ({"necessity": {"method": "reward_gap"}}, {"augment_select"}),
    ({"necessity": {"method": "ifd"}}, {"answers", "ifd", "augment_select"}),
    ({"necessity": {"beta_percentile": 30}}, {"augment_select"}),
    ({"coverage": {"method": "kmeans_quality"}}, {"seed_select", "augment_select"}),
    ({"coverage": {"method": "facility_location"}}, {"seed_select", "augment_select"}),
    ({"coverage": {"neighbours": 8}}, set()),  # a field k_center does not read
    ({"quality": {"alpha_percentile": 40}}, {"high_quality"}),
    ({"seed_selection": {"tokens": 5000}}, {"seed_select"}),
    ({"necessity": {"source_shares": {"gsm8k*": 0.2}}}, {"augment_select"}),
])
def test_a_method_changes_the_parameters_of_only_the_stages_it_affects(overrides, changed):
    before, after = _keys({}), _keys(overrides)
    assert {name for name in before if before[name] != after[name]} == changed


def _embed_and_rows(workspace: Path, n: int = 60):
    from stage_helpers import run_body, table_artifact

    from mods.models.embedding import embeddings_table

    vectors, sources, _, quality = _candidates(n)
    ids = [f"r{i:03d}" for i in range(n)]
    rows = pd.DataFrame({"id": ids, "instruction": [f"task {i}" for i in range(n)], "input": "",
                         "output": [f"answer {i}" * (1 + i % 5) for i in range(n)], "source": sources,
                         "quality_score": quality})

    def body(ctx):
        import pyarrow.parquet as pq

        pq.write_table(embeddings_table(ids, vectors), ctx.out / "embeddings.parquet")

    embed = run_body(workspace, "embed", {"n": n}, {}, body, version="test").artifact
    return vectors, {"embed": embed, "high_quality": table_artifact(workspace, "high_quality", {"rows.parquet": rows})}


def test_seed_select_keys_follow_the_method_and_the_default_output_is_k_center(tmp_path: Path):
    from mods.config import PipelineConfig
    from mods.core.engine import Engine
    from mods.pipeline import stage_params
    from mods.selection.kcenter import k_center_greedy
    from mods.selection.thresholds import selection_frame

    vectors, inputs = _embed_and_rows(tmp_path / "ws")
    engine = Engine(tmp_path / "ws", progress=False)
    runs = {}
    for method in METHODS:
        config = PipelineConfig.model_validate({"coverage": {"method": method}, "seed_selection": {"k": 9}})
        runs[method] = engine.resolve("seed_select", stage_params(config, ["x"])["seed_select"], inputs)
    assert len({run.key for run in runs.values()}) == 3
    outcome = engine.run(runs["k_center"])
    selected = pd.read_parquet(outcome.artifact.dir(engine.workspace) / "selected.parquet")
    expected = selection_frame([f"r{i:03d}" for i in range(60)], k_center_greedy(vectors, 9, seed=0))
    pd.testing.assert_frame_equal(selected, expected)
    for method in ("kmeans_quality", "facility_location"):
        picked = pd.read_parquet(engine.run(runs[method]).artifact.dir(engine.workspace) / "selected.parquet")
        assert len(picked) == 9 and picked["id"].is_unique and picked["radius_after"].is_monotonic_decreasing


# --- the evaluation's longest baseline ---------------------------------------------------------------


def test_longest_baseline_takes_the_longest_answers_in_rows_or_tokens(tiny_llama_dir: Path):
    from mods.evaluation.runs import baseline_rows
    from mods.selection.budgets import count_tokens

    pool = pd.DataFrame({"id": [f"p{i}" for i in range(8)], "instruction": "Say it.", "input": "",
                         "output": ["x" * n for n in (5, 50, 20, 50, 1, 80, 30, 10)]})
    rows = baseline_rows("longest", 3, pool, pd.DataFrame(), pool, None, seed=0)
    assert rows["id"].tolist() == ["p5", "p1", "p3"]  # longest first, ties by id
    costs = dict(zip(pool["id"], count_tokens(str(tiny_llama_dir), pool)))
    budget = costs["p5"] + costs["p1"] + 1
    rows = baseline_rows("longest", 3, pool, pd.DataFrame(), pool, None, seed=0, tokens=budget,
                         base_model=str(tiny_llama_dir))
    assert sum(costs[i] for i in rows["id"]) <= budget and rows["id"].tolist()[:2] == ["p5", "p1"]
    # A conversation's answers are all its assistant turns: three of 30 characters beat one of 80.
    from mods.data.conversations import WHOLE_CONVERSATION, dumps

    chat = [{"role": role, "content": "y" * 30} for role in ("user", "assistant") * 3]
    pool = pool.assign(history="[]", metadata="{}", messages="")
    pool.loc[0, ["output", "metadata", "messages"]] = ["y" * 30, f'{{"{WHOLE_CONVERSATION}": true}}', dumps(chat)]
    rows = baseline_rows("longest", 2, pool, pd.DataFrame(), pool, None, seed=0)
    assert rows["id"].tolist() == ["p0", "p5"]


# --- real rows --------------------------------------------------------------------------------------


def test_coverage_methods_on_real_rows_respect_shares_and_token_budgets(shared_data: Path, tiny_llama_dir: Path):
    from mods.selection.budgets import count_tokens, make_budget, source_groups
    from mods.models.embedding import EmbeddingConfig, encode_texts, load_embedder

    frames = []
    for name in ("gsm8k_train_alpacafmt.json", "llamafactory_alpaca_en_demo.json", "codealpaca_2k.json"):
        path = shared_data / "pool" / name
        if not path.is_file():
            pytest.skip(f"{path} not found")
        records = json.loads(path.read_text())[:120]
        frames.append(pd.DataFrame({"instruction": [str(r.get("instruction", "")) for r in records],
                                    "input": [str(r.get("input", "")) for r in records],
                                    "output": [str(r.get("output", "")) for r in records], "source": str(path)}))
    rows = pd.concat(frames, ignore_index=True)
    config = EmbeddingConfig(device="cpu", batch_size=64)
    vectors = encode_texts(load_embedder(config), rows["instruction"].tolist(), config, progress=False)
    costs = count_tokens(str(tiny_llama_dir), rows)
    sources = rows["source"].tolist()
    shares = {"gsm8k*": 0.3}
    for method in METHODS:
        budget = make_budget("tokens", 8000, costs, sources, {}, shares)
        picks = _select(method, vectors, budget, None)
        again = _select(method, vectors, make_budget("tokens", 8000, costs, sources, {}, shares), None)
        assert np.array_equal(picks, again) and costs[picks].sum() <= 8000
        gsm = source_groups(sources, ["gsm8k*"])[picks] == 0
        assert costs[picks][gsm].sum() <= 0.3 * 8000


# --- the flows: another method in the same workspace, then the two runs compared ----------------------


@pytest.mark.flow
def test_a_second_configuration_reuses_the_pool_stages_and_is_compared_with_the_first(
        prefect_harness, tiny_llama_dir: Path, tmp_path: Path):
    from pipeline_helpers import summary, tiny_config

    from flows.evaluate import mods_evaluate
    from flows.mods_pipeline import mods_pipeline
    from mods.config import EvaluationConfig, PipelineConfig

    first = tiny_config(tmp_path, tiny_llama_dir)
    first_result = mods_pipeline(config=first)
    workspace = Path(first.workspace)
    values = first.model_dump(mode="json")
    values["coverage"] = {"method": "facility_location", "neighbours": 8}
    values["necessity"].update({"method": "ifd", "beta_percentile": 50})
    values["seed_selection"]["tokens"] = 120
    second_result = mods_pipeline(config=PipelineConfig.model_validate(values))
    executed = set(second_result["executed"])
    assert not executed & {"ingest", "sample", "quality", "high_quality", "embed"}
    assert {"seed_select", "ifd", "augment_select", "export"} <= executed
    assert summary(workspace, "ifd")["rows"] > 0 and summary(workspace, "answers")["rows"] == 0
    seed = summary(workspace, "seed_select")
    assert seed["unit"] == "tokens" and 0 < seed["spent"] <= 120
    report = Path(second_result["report"]).read_text()
    assert "## Scores and cut-offs" in report and "Necessity (ifd)" in report and "◀ cut-off" in report
    assert "### Composition of the selection" in report

    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "alpha.jsonl").write_text("\n".join(json.dumps({"prompt": f"Tell me about {t}."})
                                                 for t in ["owls", "tea", "rain"]) + "\n")
    preferences = tmp_path / "prefs.json"
    preferences.write_text(json.dumps([
        {"idx": i, "instruction": f"Explain {i}.", "input": "", "response1": f"A long answer {i}.",
         "response2": "No.", "annotator1": 1, "annotator2": 1, "annotator3": 1} for i in range(3)]))
    evaluation = EvaluationConfig.model_validate({
        "export_key": second_result["export_key"], "compare_with": first_result["export_key"],
        "test_sets": [], "test_files": [str(tests / "alpha.jsonl")], "prompts_per_set": 3,
        "reference_rows_per_set": 1, "baselines": ["longest"], "judge": ["scorer"],
        "generation": {"max_new_tokens": 4, "batch_size": 4, "device": "cpu"}, "reference_max_length": 64,
        "preferences": str(preferences), "agreement_pairs": None, "progress": False,
    })
    result = mods_evaluate(workspace=str(workspace), config=evaluation)
    document = json.loads(Path(result["evaluation_json"]).read_text())
    label = f"run-{first_result['export_key'][:8]}"
    assert {row["b"] for row in document["comparisons"]} == {"longest", label}
    baseline = next((workspace / "artifacts" / "evaluate_baseline").glob("[!.]*"))
    pool = pd.read_parquet(next((workspace / "artifacts" / "sample").glob("[!.]*")) / "rows.parquet")
    longest = pd.read_parquet(baseline / "selected.parquet")
    assert longest["output"].str.len().min() >= pool["output"].str.len().median()
