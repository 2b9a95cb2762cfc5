"""The real `mods` command as a process (a terminal's foreground job), and its children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from pipeline_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]

def big_pool(path: Path, rows: int = 320) -> Path:
    """Enough rows that the quality stage takes many shards (8 rows each)."""
    if not path.exists():
        words = ["river", "stone", "cloud", "lamp", "garden", "engine", "letter", "market", "island", "violin"]
        lines = []
        for i in range(rows):
            a, b = words[i % 10], words[(i // 10) % 10]
            lines.append(json.dumps({"instruction": f"Describe a {a} near a {b} in story {i}.", "input": "",
                                     "output": f"The {a} stood by the {b}; story {i} says it was quiet."}))
        path.write_text("\n".join(lines) + "\n")
    return path


def write_config(tmp_path: Path, tiny_llama: Path, name: str, workspace: str, pool: Path | None = None,
                 rows_per_shard: int = 1000, **overrides) -> Path:
    config = tiny_config(tmp_path, tiny_llama, pool=pool, workspace=workspace, rows_per_shard=rows_per_shard)
    values = config.model_dump(mode="json")
    for dotted, value in overrides.items():
        section, field = dotted.split("__")
        values[section][field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT)})
    return env


def mods(tmp_path: Path, *args: str, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout, **popen)


def _as_in_a_terminal() -> None:
    # A shell starts background jobs with SIGINT ignored, and the ignored disposition is
    # inherited (CI or `make test &` may run us so); a terminal's foreground job has the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_mods(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT,
                            env={**cli_env(tmp_path), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_as_in_a_terminal)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def child_pids(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == pid]


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists() and _state(pid) not in ("Z", "gone")]


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
