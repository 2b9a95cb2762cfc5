"""Prefect artifacts (what the UI shows for a run): a summary per stage, the report, the plot."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from mods.artifacts import StageOutcome, read_marker
from mods.report import COVERAGE_PNG, REPORT_MD


def _artifact_key(stage: str, suffix: str = "") -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes.
    return f"mods-{stage.replace('_', '-')}{suffix}"


def publish_stage(stage: str, outcome: StageOutcome) -> None:
    marker = read_marker(outcome.artifact.path)
    rows = [{"field": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else v}
            for k, v in marker["summary"].items()]
    rows += [{"field": "artifact", "value": outcome.artifact.path}, {"field": "seconds", "value": marker["seconds"]}]
    create_table_artifact(rows, key=_artifact_key(stage), description=f"{stage} artifact {outcome.artifact.key}")
    if stage == "export":
        out = Path(outcome.artifact.path)
        create_markdown_artifact((out / REPORT_MD).read_text(), key="mods-report", description="MoDS selection report")
        png = out / COVERAGE_PNG
        if png.is_file():
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            create_image_artifact(f"data:image/png;base64,{data}", key="mods-coverage",
                                  description="Coverage radius against k: k-center vs random")
