"""`mods evaluate [--workspace DIR] [--config FILE] [--set KEY=VALUE ...]`: the evaluation flow
on a finished run, with the table summed up and the output paths printed.

Light at import (the parser is built for every `mods` command); the flow is imported only
when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


class EvaluateUsageError(ValueError):
    """A bad option or configuration value: one line, no traceback."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `evaluate` subcommand (handler set as both `func` and `handler`)."""
    p = subparsers.add_parser(
        "evaluate",
        help="does the selection help? MoDS vs same-size baselines on the paper's test sets (Prefect flow)",
        description="Train same-size baselines with the run's training settings, answer the test prompts with every "
        "model, judge MoDS against each baseline, and measure each judge against human votes. Needs a finished "
        "`mods run` in the workspace; everything is cached.",
    )
    p.add_argument("--workspace", help="the pipeline's artifact folder (default: the config file's, else work)")
    p.add_argument("--config", help="YAML file: its `evaluation:` section (the file `mods run --config` takes), "
                                    "or EvaluationConfig fields at the top level")
    p.add_argument("--set", action="append", metavar="[evaluation.]FIELD=VALUE",
                   help="override one value, e.g. --set evaluation.prompts_per_set=20 --set judge=[scorer,llm]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=handle_evaluate, handler=handle_evaluate)


def load_evaluation_config(config_file: str | None, sets: list[str], workspace: str | None,
                           quiet: bool = False) -> tuple[str, Any]:
    """(workspace, EvaluationConfig) from a YAML file, --set overrides and --workspace."""
    import yaml
    from pydantic import ValidationError

    from mods.config import EvaluationConfig, deep_update, set_dotted

    values: dict[str, Any] = {}
    file_workspace = None
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise EvaluateUsageError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise EvaluateUsageError(f"config file {path}: not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(loaded, dict):
            raise EvaluateUsageError(f"config file {path} must hold a mapping at the top level")
        file_workspace = loaded.get("workspace")
        if "evaluation" in loaded:
            values = loaded["evaluation"] or {}
        else:  # EvaluationConfig fields at the top level (pipeline-only fields are left to `mods run`)
            values = {k: v for k, v in loaded.items() if k in EvaluationConfig.model_fields}
    overrides: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise EvaluateUsageError(f"--set {item!r}: expected FIELD=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("evaluation.")
        try:
            set_dotted(overrides, key, raw)
        except yaml.YAMLError as error:
            raise EvaluateUsageError(f"--set {item!r}: not a YAML value ({' '.join(str(error).split())})") from None
    values = deep_update(values, overrides)
    if quiet:
        values["progress"] = False
    try:
        config = EvaluationConfig.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"evaluation.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise EvaluateUsageError(f"configuration: {problems}") from None
    return workspace or file_workspace or "work", config


def summary_lines(document: dict[str, Any], result: dict[str, Any] | None = None) -> list[str]:
    """What the command prints: MoDS against each baseline, summed over test sets, per judge,
    each judge's and the pipeline scorer's agreement with people (a figure below the trust
    threshold said plainly), and, given the flow's ``result``, where the outputs are."""
    from mods.evaluation.report import agreement_phrase

    threshold = document.get("trust_threshold", 0.6)
    lines = []
    judges = [document["judge"]] if isinstance(document["judge"], str) else document["judge"]
    for judge in judges:
        agreement = document["judge_agreement"][judge]
        trust = (f"usable (at least {threshold:.0%})" if agreement.get("trusted") else
                 f"NOT TRUSTWORTHY: below {threshold:.0%} agreement with people, so these counts are no verdict")
        lines.append(f"  {judge} judge: {agreement_phrase(agreement)}; {trust}")
        for baseline in dict.fromkeys(c["b"] for c in document["comparisons"] if c["judge"] == judge):
            rows = [c for c in document["comparisons"] if c["judge"] == judge and c["b"] == baseline]
            w, t, lo = (sum(c[k] for c in rows) for k in ("win", "tie", "lose"))
            lines.append(f"    MoDS vs {baseline:<12} win {w:>3}  tie {t:>3}  lose {lo:>3}")
    if not any(document["judge_agreement"][j].get("trusted") for j in judges):
        lines.append(f"  No judge here agrees with people on {threshold:.0%} of the pairs: this evaluation does not "
                     "say whether the selection helps.")
    scorer = document.get("scorer_agreement")
    if scorer:
        lines.append(f"  pipeline quality scorer: {agreement_phrase(scorer)}"
                     + ("" if scorer.get("trusted") else f"; below {threshold:.0%}")
                     + ("; it is the scorer judge" if scorer.get("same_as_scorer_judge") else ""))
    if result:
        lines += [f"  table (JSON): {result['evaluation_json']}", f"  chart:        {result['chart']}",
                  f"  report:       {result['report']}"]
    return lines


def handle_evaluate(args: argparse.Namespace) -> int:
    try:
        workspace, config = load_evaluation_config(args.config, args.set or [], args.workspace, args.quiet)
    except EvaluateUsageError as error:
        print(f"mods evaluate: {error}", file=sys.stderr)
        return 2
    from mods.evaluation.runs import latest_export

    try:  # before the flow starts: a missing run is the user's, one line, no Prefect traceback
        latest_export(Path(workspace).expanduser().resolve(), config.export_key)
    except ValueError as error:
        print(f"mods evaluate: {error}", file=sys.stderr)
        return 2
    from flows.evaluate import mods_evaluate

    result = mods_evaluate(workspace=workspace, config=config)
    document = json.loads(Path(result["evaluation_json"]).read_text())
    print("\nMoDS evaluation finished (export " + result["export_key"] + ").")
    print("\n".join(summary_lines(document, result)))
    return 0
