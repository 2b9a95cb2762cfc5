"""A stage is one typed object, in the style of NVIDIA NeMo Curator's ``ProcessingStage``.

Everything about a stage lives on its class: its name and code version, the resources it
needs, its named inputs (other stages' artifacts), its one parameter model, the files it
writes, what its results depend on beyond parameters and inputs, and either a body
(``run``) or the row-wise hooks (``load`` … ``assemble``). Every runner — the Prefect flow,
a GPU worker, the command line — hands a stage to the engine (mods/core/engine.py); no
runner looks inside one.

A new stage is a class in the file of its phase (mods/stages/), decorated with
``@register``, and a line in the pipeline's list (mods/pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Mapping, TypeVar

import pandas as pd
from pydantic import BaseModel, ConfigDict

from mods.core.artifacts import Artifact, Workspace

ResourceKind = Literal["cpu", "gpu", "gpus"]


@dataclass(frozen=True)
class Resources:
    """What a stage needs of a machine: no GPU, one GPU, or every GPU of one machine
    (training: DDP/FSDP over all of them). Where it runs is the executor's decision; a
    stage that may use a GPU still runs on a CPU."""

    gpus: int | Literal["all"] = 0

    @property
    def kind(self) -> ResourceKind:
        """The routing tag: "cpu", "gpu" (one) or "gpus" (a whole machine)."""
        if self.gpus == "all":
            return "gpus"
        return "gpu" if self.gpus else "cpu"


CPU = Resources()
ONE_GPU = Resources(gpus=1)
WHOLE_MACHINE = Resources(gpus="all")


class StageParams(BaseModel):
    """Base of every stage's parameter model: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass
class StageContext:
    """What a stage body gets: where to write, its inputs' folders, a scratch folder for
    crash-surviving work (checkpoints), and the run's options."""

    out: Path
    inputs: dict[str, Path]
    scratch: Path
    workspace: Workspace
    progress: bool = True


P = TypeVar("P", bound=BaseModel)


class Stage(Generic[P]):
    """A stage with a body: ``run`` writes the artifact's files into ``ctx.out``."""

    name: ClassVar[str]
    version: ClassVar[str]  # bump when the output for the same inputs changes (why: git log of the stage)
    description: ClassVar[str]
    resources: ClassVar[Resources] = CPU
    inputs: ClassVar[tuple[str, ...]] = ()  # named inputs: artifacts of other stages
    # The files it writes (mods.core.files; a name ending in "/" is a folder): the engine
    # checks after every run that each is there, before it marks the artifact complete.
    outputs: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[type[BaseModel]]

    def key_extra(self, params: P) -> list[str]:
        """What the output depends on beyond the parameters and the inputs' content: the
        files of a model or of the sources, a scorer's definition version."""
        return []

    def input_digest(self, params: P, inputs: Mapping[str, Path]) -> Any:
        """What this stage reads of its inputs, for its key; None: every file of every input
        (from their markers, free). A stage that reads a small part of a large input (the
        training rows of a pool) returns a digest of that part, so an unchanged part keeps
        the key (early cut-off). The engine remembers it per input content, so it is computed
        once, not at every run."""
        return None

    def run(self, ctx: StageContext, params: P) -> Mapping[str, Any] | None:
        raise NotImplementedError(f"stage {self.name} has no body")

    def __repr__(self) -> str:
        return f"<stage {self.name} v{self.version} {self.resources.kind}>"


class RowwiseStage(Stage[P]):
    """Rows in, one result row per row out, computed block by block and kept per row in the
    row store (mods/core/rowstore.py), so only rows the store lacks are computed, shard by
    shard, on any number of workers."""

    def load(self, inputs: Mapping[str, Path], params: P) -> pd.DataFrame:
        """The rows to process, from the input artifacts' folders."""
        raise NotImplementedError

    def row_keys(self, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        """Each row's store key and its cost (the sort key that groups similar rows)."""
        raise NotImplementedError

    def block_rows(self, params: P) -> int:
        """Rows per call of ``process_batch``."""
        raise NotImplementedError

    def row_fingerprint_extra(self, params: P, inputs: Mapping[str, Artifact]) -> list[str]:
        """What a row's result depends on beyond the parameters (batch sizes excluded)."""
        return self.key_extra(params)

    def setup_folders(self, inputs: Mapping[str, Path]) -> dict[str, Path]:
        """Folders ``setup`` needs (a seed model), from the inputs' folders."""
        return {}

    def setup(self, params: P, folders: Mapping[str, Path]) -> Any:
        """Load what ``process_batch`` needs (a model), once per process."""
        return None

    def process_batch(self, state: Any, block: pd.DataFrame, params: P) -> pd.DataFrame:
        """The result columns for one block, in row order."""
        raise NotImplementedError

    def teardown(self, state: Any) -> None:
        """Release what ``setup`` made when the process is done with it (a model served by
        a child process is stopped here); a loaded model needs nothing."""

    def assemble(self, ctx: StageContext, params: P, rows: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any]:
        """Write the stage's artifact from all its rows and their results."""
        raise NotImplementedError

    def empty_results(self, params: P) -> pd.DataFrame | None:
        """The result columns for no rows without loading a model; None: ``setup`` and
        ``process_batch`` on an empty block."""
        return None


STAGES: dict[str, Stage] = {}

S = TypeVar("S", bound=type)


def register(cls: S) -> S:
    """Class decorator: one instance of the stage in the registry, by name."""
    if cls.name in STAGES and type(STAGES[cls.name]) is not cls:
        raise ValueError(f"two stages named {cls.name!r}")
    STAGES[cls.name] = cls()
    return cls


def get_stage(name: str) -> Stage:
    """The registered stage of that name. The method's stages register when ``mods.stages``
    is imported; the runners (``mods.pipeline``, ``tasks``, ``flows``) import it, the core never
    does (it knows stages only through this registry)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; registered stages: {', '.join(STAGES) or 'none'} "
                         "(the method's stages register when mods.stages is imported)")
    return STAGES[name]


def text_cost(*columns: pd.Series) -> pd.Series:
    """A row's cost for shard ordering: the characters of the given columns."""
    total = None
    for column in columns:
        length = column.fillna("").astype(str).str.len()
        total = length if total is None else total + length
    return total


def read_table(folder: Path, filename: str) -> pd.DataFrame:
    return pd.read_parquet(Path(folder) / filename)


def missing_outputs(stage: Stage, folder: Path) -> list[str]:
    """The declared outputs of ``stage`` that ``folder`` lacks (a folder for a name ending in "/")."""
    return [name for name in stage.outputs
            if not ((folder / name).is_dir() if name.endswith("/") else (folder / name).is_file())]
