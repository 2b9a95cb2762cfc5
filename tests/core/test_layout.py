"""House rules that could silently erode: the core stays Prefect-free, a stage is one object, modules\nstay readable in one sitting, the configuration reference stays true."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
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
        assert set(stage.outputs) <= ARTIFACT_FILES, stage.outputs  # named in mods/core/files.py
        assert issubclass(stage.params, BaseModel)
        overrides_run = type(stage).run is not Stage.run
        assert overrides_run != isinstance(stage, RowwiseStage)  # a body, or the row-wise hooks
        task = stage_task(name)
        assert task.name == name and f"resource:{stage.resources.kind}" in task.tags
    # One adapter, no module per stage.
    assert sorted(p.name for p in (ROOT / "tasks").glob("*.py")) == ["__init__.py", "reporting.py"]


ARTIFACT_FILES = {value for name, value in vars(__import__("mods.core.files").core.files).items() if name.isupper()}


def test_artifact_files_are_named_once_and_imported_where_read_or_written():
    """No stage, report or flow spells an artifact's file name: it imports its constant."""
    spelled = []
    for package in OUR_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "mods" / "core" / "files.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ARTIFACT_FILES:
                    spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert spelled == []


def test_no_module_of_ours_is_over_600_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for package in OUR_PACKAGES for p in (ROOT / package).rglob("*.py")}
    assert {path: lines for path, lines in sizes.items() if lines > 600} == {}


# The rooms of the house (docs/architecture.md), lowest first. A module imports from its own
# room and from rooms below it; rooms on one level do not import each other.
ROOMS: dict[str, int] = {
    "mods.core": 0,
    "mods.data": 1,
    "mods.models": 2,
    "mods.training": 3,
    "mods.scoring": 4, "mods.selection": 4, "mods.generation": 4,
    "mods.evaluation": 5,
    "mods.config": 6, "mods.report": 6,
    "mods.stages": 7,
    "mods.pipeline": 8,
    "tasks": 9,
    "flows": 10,
    "deployments": 11,
}
OUR_PACKAGES = ("mods", "tasks", "flows", "deployments")
# Modules whose functions import what a command needs when it runs, so that `mods --help`
# or a mistyped flag answers in a second instead of loading torch, transformers and Prefect.
LAZY_BY_DESIGN = {"flows.cli", "flows.cli_evaluate", "flows.cli_ingest", "flows.cli_stages"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_imports() -> dict[str, list[tuple[str, int, bool]]]:
    """Each module of ours -> the modules of ours it imports: (module, line, inside a function)."""
    modules = {module_name(p): p for package in OUR_PACKAGES for p in (ROOT / package).rglob("*.py")}

    def ours(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, list[tuple[str, int, bool]]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for node in ast.walk(fn)}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                imported = ours(target)
                if imported and imported != name:
                    found.append((imported, node.lineno, id(node) in in_function))
        graph[name] = found
    return graph


def room_of(module: str) -> str:
    return max((room for room in ROOMS if module == room or module.startswith(room + ".")), key=len)


def test_the_rooms_cover_every_module_and_imports_only_run_down():
    graph = our_imports()
    roomless = [m for m in graph if m != "mods" and not any(m == r or m.startswith(r + ".") for r in ROOMS)]
    assert roomless == []  # a new package gets its line in ROOMS and in docs/architecture.md
    upward = []
    for module, imports in graph.items():
        if module == "mods":  # the package itself: empty
            continue
        here = room_of(module)
        for imported, line, _ in imports:
            there = room_of(imported)
            if ROOMS[there] > ROOMS[here] or (ROOMS[there] == ROOMS[here] and there != here):
                upward.append(f"{module}:{line} imports {imported} ({here} -> {there})")
    assert upward == []


def test_no_import_circle_among_our_modules():
    graph = {module: {imported for imported, _, _ in imports} for module, imports in our_imports().items()}
    # Tarjan's strongly connected components: a circle is a component of more than one module.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert circles == []


def test_our_modules_import_each_other_at_the_top_except_the_command_line():
    """An import inside a function hides a dependency (and, before, hid circles); only the
    command line keeps them, to answer fast."""
    hidden = [f"{module}:{line} imports {imported}" for module, imports in our_imports().items()
              if module not in LAZY_BY_DESIGN for imported, line, in_function in imports if in_function]
    assert hidden == []


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The three tests above on a made-up package: they find what they look for."""
    for name, text in {"mods/core/a.py": "from mods.stages.b import x\n",
                       "mods/stages/b.py": "from mods.core.a import y\n",
                       "mods/data/c.py": "def f():\n    from mods.core.a import y\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = our_imports()
    assert graph["mods.core.a"] == [("mods.stages.b", 1, False)]
    assert graph["mods.data.c"] == [("mods.core.a", 2, True)]
    with pytest.raises(AssertionError, match="mods.core.a:1 imports mods.stages.b"):
        test_the_rooms_cover_every_module_and_imports_only_run_down()
    with pytest.raises(AssertionError, match="mods.core.a"):
        test_no_import_circle_among_our_modules()
    with pytest.raises(AssertionError, match="mods.data.c:2 imports mods.core.a"):
        test_our_modules_import_each_other_at_the_top_except_the_command_line()
