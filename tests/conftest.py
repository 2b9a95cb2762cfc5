"""Shared test setup: offline, a private PREFECT_HOME, tiny models, one Prefect harness, a
marker per layer (tests/core, tests/method, tests/orchestration, tests/system).

Environment variables are set before anything imports Prefect or transformers, so no
test talks to a network or leaks cached results into the user's ~/.prefect.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="mods-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED_DATA = ROOT.parent / "shared" / "data"

import pytest  # noqa: E402


# Tests live by layer: tests/<layer>/test_*.py, each marked with its layer (pytest -m core).
LAYERS = ("core", "method", "orchestration", "system")


# The layers that wait longest (servers, heartbeat windows, worker processes) start first,
# so that `pytest -n 2 --dist loadfile` (make test) overlaps their waiting with the rest.
FIRST = ("system", "orchestration", "method", "core")
# Within them, the longest file first (an image build, a compose stack, containers).
LONGEST = ("test_containers.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        layer = Path(str(item.fspath)).parent.name
        if layer in LAYERS:
            item.add_marker(layer)
    def order(item: pytest.Item) -> tuple[int, int]:
        path = Path(str(item.fspath))
        layer = FIRST.index(path.parent.name) if path.parent.name in FIRST else len(FIRST)
        return layer, 0 if path.name in LONGEST else 1

    items.sort(key=order)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def prefect_harness():
    """The Prefect test server, started once per session and only for flow tests (~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
