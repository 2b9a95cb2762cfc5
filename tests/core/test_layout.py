"""House rules that could silently erode: the core stays Prefect-free, a stage is one object, modules\nstay readable in one sitting, the configuration reference stays true."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]


def test_core_package_never_imports_prefect():
    offenders = []
    for path in (ROOT / "mods").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in {"prefect", "tasks", "flows"}]
    assert offenders == []
    # and importing every core module at run time pulls in no Prefect either
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "mods").rglob("*.py") if p.stem != "__init__")
    code = f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_configuration_table_matches_the_config_model():
    from mods.config import config_reference_markdown

    assert config_reference_markdown() in (ROOT / "docs" / "configuration.md").read_text()


def test_every_stage_is_one_typed_object_that_becomes_a_task_with_its_resource():
    import mods.stages  # noqa: F401  (registers every stage)
    from mods.core.stage import STAGES, Resources, RowwiseStage, Stage
    from mods.pipeline import PIPELINE
    from tasks import stage_task

    ours = {name: stage for name, stage in STAGES.items() if type(stage).__module__.startswith("mods.stages.")}
    assert set(PIPELINE) <= set(ours) and len(ours) == len(PIPELINE) + 6  # and the evaluation's six
    for name, stage in ours.items():
        assert isinstance(stage, Stage) and stage.name == name and stage.version and stage.description
        assert isinstance(stage.resources, Resources) and stage.outputs
        assert issubclass(stage.params, BaseModel)
        overrides_run = type(stage).run is not Stage.run
        assert overrides_run != isinstance(stage, RowwiseStage)  # a body, or the row-wise hooks
        task = stage_task(name)
        assert task.name == name and f"resource:{stage.resources.kind}" in task.tags
    # One adapter, no module per stage.
    assert sorted(p.name for p in (ROOT / "tasks").glob("*.py")) == ["__init__.py", "reporting.py"]


def test_no_module_of_the_core_package_is_over_600_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "mods").rglob("*.py")}
    assert {path: lines for path, lines in sizes.items() if lines > 600} == {}
