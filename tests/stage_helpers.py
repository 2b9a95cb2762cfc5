"""A stage made from a function, for tests of the engine's guarantees without a real stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ConfigDict

from mods.core.artifacts import Workspace
from mods.core.engine import Engine, StageOutcome
from mods.core.stage import STAGES, Stage, StageContext


class AnyParams(BaseModel):
    model_config = ConfigDict(extra="allow")


def fn_stage(name: str, body: Callable[[StageContext], Mapping[str, Any] | None], version: str = "1",
             inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ()) -> Stage:
    """A stage whose run() is ``body`` (not registered: see ``run_body``)."""
    cls = type(f"FnStage_{name}", (Stage,), {
        "name": name, "version": version, "description": "a test stage", "inputs": inputs, "params": AnyParams,
        "outputs": outputs,
        "run": lambda self, ctx, params: body(ctx),
    })
    return cls()


def run_body(workspace: Workspace | str | Path, name: str, params: dict[str, Any], inputs: Mapping[str, Any],
             body: Callable[[StageContext], Mapping[str, Any] | None], verify: bool = False,
             version: str = "1", outputs: tuple[str, ...] = ()) -> StageOutcome:
    """What the engine does with a stage of this body: resolve, then run (or reuse)."""
    engine = Engine(workspace, verify=verify, progress=False)
    stage = fn_stage(name, body, version, tuple(inputs), outputs)
    # Registered while it runs (the engine finds a run's stage by name); a real stage of the
    # same name (a fake upstream "high_quality") is put back afterwards.
    real = STAGES.get(name)
    STAGES[name] = stage
    try:
        return engine.run(engine.resolve(stage, params, inputs))
    finally:
        if real is None:
            STAGES.pop(name, None)
        else:
            STAGES[name] = real


def table_artifact(workspace: Workspace | str | Path, stage: str, tables: Mapping[str, Any]) -> Any:
    """A complete artifact of ``stage`` holding the given DataFrames as Parquet files (a
    fake upstream for stages under test)."""

    def body(ctx: StageContext) -> None:
        for filename, frame in tables.items():
            frame.to_parquet(ctx.out / filename, index=False)

    return run_body(workspace, stage, {"tables": sorted(tables)}, {}, body, version="test").artifact
