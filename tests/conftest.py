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
from durations import read_durations  # noqa: E402

# Tests live by layer: tests/<layer>/test_*.py, each marked with its layer (pytest -m core).
LAYERS = ("core", "method", "orchestration", "system")


# The longest file first (tests/durations.json, measured: tests/durations.py), so that the
# test processes of `make test` (pytest-xdist, whole files, --no-loadscope-reorder: xdist's
# default reorder puts files with many tests first and a long two-test file last) end
# together. A file without a recorded time goes after the recorded ones, in collection order.
FILE_SECONDS = read_durations()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        layer = Path(str(item.fspath)).parent.name
        if layer in LAYERS:
            item.add_marker(layer)
        # What a test starts follows from the fixtures it uses, so that `make test-fast`
        # (-m "not flow and not vllm ...") cannot take a server or an engine by an omission.
        if "prefect_harness" in item.fixturenames:
            item.add_marker("flow")
        if "shared_vllm" in item.fixturenames:
            item.add_marker("vllm")

    def longest_first(item: pytest.Item) -> float:
        path = Path(str(item.fspath)).resolve()
        return -FILE_SECONDS.get(path.relative_to(tests_dir).as_posix() if path.is_relative_to(tests_dir) else "", 0.0)

    items.sort(key=longest_first)  # stable: a file's tests keep their order


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
def shared_vllm():
    """The session's vLLM engine (tests/vllm_helpers.py); skips without vLLM, fails in CI."""
    from vllm_helpers import SharedEngine, require_vllm

    require_vllm()
    shared = SharedEngine()
    yield shared
    shared.close()


@pytest.fixture(scope="session")
def prefect_harness():
    """The Prefect test server, started once per session and only for flow tests (~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
