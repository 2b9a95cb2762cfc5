"""The MoDS pipeline as one Prefect flow: quality → coverage → necessity → final training.

Every stage is a cached task whose result is an artifact folder in the workspace; GPU stages
go to a GPU work pool when ``execution.gpu_deployment`` names the gpu-stage deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from mods.artifacts import Artifact, Workspace, is_complete
from mods.config import PipelineConfig
from mods.stages import STAGES, demo_sources, plan_key
from tasks import STAGE_TASKS
from tasks._stage import with_workspace_cache

# Where GPU stages run comes from the deployment (its job variables set this in the flow
# run's environment), never from the caller's config: Prefect merges a caller's
# parameters one level deep, so a field inside `config` would be lost.
GPU_DEPLOYMENT_ENV = "MODS_GPU_DEPLOYMENT"


def resolve_sources(data: list[str]) -> list[str]:
    """Absolute paths (workers may run elsewhere); the embedded demo pool when empty."""
    if not data:
        return demo_sources()
    return [str(Path(p).expanduser().resolve()) if not any(c in p for c in "*?[") else p for p in data]


class StageRunner:
    """Runs stages in this process, or GPU stages on the GPU pool's deployment."""

    def __init__(self, workspace: str, gpu_deployment: str | None) -> None:
        self.workspace = workspace
        self.gpu_deployment = gpu_deployment

    def __call__(self, stage: str, params: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        if self.gpu_deployment and STAGES[stage].spec.resources == "gpu":
            return self.remote(stage, params, inputs)
        task_ = with_workspace_cache(STAGE_TASKS[stage], self.workspace)
        return task_(workspace=self.workspace, params=params, inputs=inputs)

    def remote(self, stage: str, params: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        flow_run = run_deployment(
            self.gpu_deployment,
            parameters={"workspace": self.workspace, "stage": stage, "params": params, "inputs": inputs},
            flow_run_name=f"{stage}",
            tags=["mods", "resource:gpu"],
        )
        if not flow_run.state or not flow_run.state.is_completed():
            state = flow_run.state.name if flow_run.state else "unknown"
            raise RuntimeError(f"GPU stage {stage!r} ended {state} on deployment {self.gpu_deployment!r}")
        # The artifact, not the worker's return value, is the source of truth.
        key = plan_key(stage, params, inputs)
        path = Workspace(self.workspace).artifact_dir(stage, key)
        if not is_complete(path):
            raise RuntimeError(
                f"GPU stage {stage!r} finished but {path} is missing: does the worker share the workspace?"
            )
        return Artifact(stage=stage, key=key, path=str(path)).model_dump()


@flow(name="mods-pipeline", log_prints=True)
def mods_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008 (the UI form)
    """Select instruction-tuning data for a target LLM with MoDS (arXiv 2311.15653)."""
    logger = get_run_logger()
    workspace = str(Path(config.workspace).resolve())
    progress = config.execution.progress
    run = StageRunner(workspace, config.execution.gpu_deployment)
    scorer = {**config.quality.scorer.model_dump(mode="json"), "progress": progress}

    ingest = run("ingest", {"sources": resolve_sources(config.data),
                            "ingest": config.ingest.model_dump(mode="json"), "progress": progress}, {})
    sample = run("sample", config.sample.model_dump(mode="json"), {"ingest": ingest})
    quality = run("quality", scorer, {"sample": sample})
    high_quality = run("high_quality", {"alpha": config.quality.alpha, "keep_fraction": config.quality.keep_fraction},
                       {"sample": sample, "quality": quality})
    embed = run("embed", {**config.embedding.model_dump(mode="json"), "progress": progress},
                {"high_quality": high_quality})
    seed_select = run("seed_select", config.seed_selection.model_dump(mode="json"), {"embed": embed})
    seed_train = run("seed_train", {"base_model": config.base_model, "progress": progress,
                                    "train": config.seed_training.model_dump(mode="json")},
                     {"high_quality": high_quality, "seed_select": seed_select})
    answers = run("answers", {**config.necessity.generation.model_dump(mode="json"), "progress": progress},
                  {"high_quality": high_quality, "seed_select": seed_select, "seed_train": seed_train})
    necessity = run("necessity", scorer, {"answers": answers})
    augment_select = run(
        "augment_select",
        config.necessity.model_dump(mode="json", include={"beta", "fraction", "k", "relative_to_seed", "seed"}),
        {"embed": embed, "seed_select": seed_select, "necessity": necessity},
    )
    final_train = run("final_train", {"base_model": config.base_model, "progress": progress,
                                      "train": config.final_training.model_dump(mode="json")},
                      {"high_quality": high_quality, "seed_select": seed_select, "augment_select": augment_select})
    export = run("export", {}, {
        "ingest": ingest, "sample": sample, "quality": quality, "high_quality": high_quality, "embed": embed,
        "seed_select": seed_select, "seed_train": seed_train, "answers": answers, "necessity": necessity,
        "augment_select": augment_select, "final_train": final_train,
    })
    out = Path(export["path"])
    result = {
        "selected_jsonl": str(out / "selected.jsonl"),
        "selected_parquet": str(out / "selected.parquet"),
        "report": str(out / "report.md"),
        "coverage_png": str(out / "coverage.png"),
        "final_model": str(Path(final_train["path"]) / "model"),
        "export_key": export["key"],
    }
    logger.info("MoDS selection written: %s", result)
    return result
