"""Prefect artifacts (what the UI shows for a run): a summary per stage, the report, the
coverage curve, the score distributions with their cut-offs, and a progress bar per sharded stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from mods.core.artifacts import Workspace, read_marker
from mods.core.engine import StageOutcome
from mods.core.files import REPORT_JSON, REPORT_MD
from mods.report import scores_markdown

# Rows of the coverage table: enough to read the curve's shape, few enough for one screen.
COVERAGE_TABLE_ROWS = 12


def _artifact_key(stage: str, suffix: str = "") -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes.
    return f"mods-{stage.replace('_', '-')}{suffix}"


def publish_stage(workspace: Workspace, stage: str, outcome: StageOutcome) -> None:
    folder = outcome.artifact.dir(workspace)
    marker = read_marker(folder)
    rows = [{"field": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else v}
            for k, v in marker["summary"].items()]
    rows += [{"field": "artifact", "value": str(folder)}, {"field": "seconds", "value": marker["seconds"]}]
    create_table_artifact(rows, key=_artifact_key(stage), description=f"{stage} artifact {outcome.artifact.key}")
    if stage == "export":
        create_markdown_artifact((folder / REPORT_MD).read_text(), key="mods-report", description="MoDS selection report")
        _publish_coverage(folder / REPORT_JSON)
        create_markdown_artifact(scores_markdown(json.loads((folder / REPORT_JSON).read_text())),
                                 key="mods-scores", description="Score distributions with the alpha and beta "
                                 "cut-offs; the selection by source and answer length")


def _publish_coverage(report_json: Path) -> None:
    """The coverage curve as a small table (the PNG stays in the export folder: an image
    inlined as a data URL overflows the artifact page)."""
    coverage = json.loads(report_json.read_text()).get("coverage", {})
    ks = coverage.get("k", [])
    if not ks:
        return
    step = max(1, len(ks) // COVERAGE_TABLE_ROWS)
    picks = sorted(set(range(0, len(ks), step)) | {len(ks) - 1})
    rows = [{"k": ks[i], "k-center radius": coverage["kcenter_radius"][i], "random radius": coverage["random_radius"][i]}
            for i in picks]
    create_table_artifact(rows, key="mods-coverage",
                          description="Coverage radius against k (lower covers better): k-center seed picks vs random")


class StageProgress:
    """Rows done / total of a sharded stage: a log line per shard and a Prefect progress
    artifact in the UI."""

    def __init__(self, stage: str, total_rows: int, done_rows: int, shards: int, logger: Any) -> None:
        self.stage, self.total, self.done, self.shards, self.logger = stage, total_rows, done_rows, shards, logger
        self.finished_shards = 0
        self.artifact_id = create_progress_artifact(
            progress=self._percent(), key=_artifact_key(stage, "-progress"),
            description=f"{stage}: rows with results / rows of the stage",
        )
        self.logger.info("%s: %d/%d rows already computed; %d rows in %d shards to go",
                         stage, done_rows, total_rows, total_rows - done_rows, shards)

    def _percent(self) -> float:
        return round(100.0 * self.done / self.total, 1) if self.total else 100.0

    def shard_done(self, rows: int) -> None:
        self.done += rows
        self.finished_shards += 1
        update_progress_artifact(self.artifact_id, self._percent())
        self.logger.info("%s: %d/%d rows (%d/%d shards)", self.stage, self.done, self.total,
                         self.finished_shards, self.shards)
