"""House rules that could silently erode: the core stays Prefect-free, the README stays true."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_every_stage_has_a_task_module_and_a_declared_resource():
    from mods.stages import STAGES
    from tasks import STAGE_TASKS

    assert set(STAGES) == set(STAGE_TASKS)
    for name, stage in STAGES.items():
        assert stage.spec.resources in {"cpu", "gpu", "gpus"}
        assert (ROOT / "tasks" / f"{name}.py").is_file()
        assert f"resource:{stage.spec.resources}" in STAGE_TASKS[name].tags
