"""Does the selection help? The paper's evaluation, over a finished pipeline run.

A finished run (its ``export`` artifact) gives the pool, the high-quality rows, the MoDS
selection and the model trained on it. This package adds what the paper compares it with,
and the judging; plain functions on DataFrames and paths, no Prefect. The stages that wire
them into the engine are in mods/stages/evaluation.py; the flow is flows/evaluate.py.

    runs.py        the run being evaluated (latest_export, pipeline_inputs, run_settings,
                   selection_ids) and the baselines of the selection's size (baseline_rows):
                   random, quality_top, seed_only, full
    answering.py   every model's answers to the test prompts (answer_prompts) and the
                   reference answers' log-likelihood (reference_loglik)
    judging.py     a judge on two models' answers (judge_pairs) and against human votes
                   (human_pair_sample, measure_judge); the judge from its parameters
                   (build_judge, judge_identity, judge_label)
    head_fit.py    the preference head's fit: is a scorer judge's agreement in-sample, and
                   is it the scorer the head was fitted with (fitted_on_these_pairs)
    statistics.py  Wilson interval, sign test, win/tie/lose per test set, trust
    report.py      evaluation.json, the chart, report.md and its caveats, and the contents
                   of the flow's Prefect artifacts (prefect_artifact_contents)

Test prompts are read by ``mods.evaluation.testsets``, judges are ``mods.evaluation.judges``, human pairs are
``mods.evaluation.preferences``.
"""
