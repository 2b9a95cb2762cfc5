"""Which Prefect server an in-process `mods run` reports to, and that it never stops one it
did not start: the configured one (PREFECT_API_URL from the environment, the profile or a
settings context) when there is one, else a temporary server of its own.

The run here fails in its ingest stage (a hub id, offline), after the server is chosen:
what is checked is the server, not the selection."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from flows.cli import main

pytestmark = pytest.mark.flow


def failing_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    pytest.importorskip("datasets", reason="datasets is not installed (a dev dependency)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return main(["run", "--data", "tatsu-lab/alpaca", "--workspace", str(tmp_path / "ws"), "--quiet"])


def answers(api_url: str) -> bool:
    try:
        return httpx.get(api_url.rstrip("/") + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def flow_run_count() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs())


def test_a_run_reports_to_the_configured_server_and_leaves_it_running(prefect_harness, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    before = flow_run_count()
    assert failing_run(tmp_path, monkeypatch) == 2
    assert answers(api_url), "the run stopped the server it was configured with"
    assert flow_run_count() == before + 1, "the run did not report to the configured server"


def test_a_temporary_server_never_stops_one_it_did_not_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import prefect.server.api.server as server_module
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.cli as cli

    # The process's default server (Prefect's own, or a test harness's), as a library
    # user of `mods` may have one, with no PREFECT_API_URL configured.
    default = server_module.SubprocessASGIServer()
    started_here = not default.running
    default.start(timeout=120)
    started: list = []
    real_start = cli._start_local_server

    def recording_start():
        server, stop = real_start()
        started.append((server, server.api_url))
        return server, stop

    monkeypatch.setattr(cli, "_start_local_server", recording_start)
    try:
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            assert cli.configured_api_url() is None
            assert failing_run(tmp_path, monkeypatch) == 2
        [(own, own_url)] = started
        assert own is not default and own_url != default.api_url
        assert answers(default.api_url), "the run stopped a server it did not start"
        assert server_module.SubprocessASGIServer._instances.get(None) is default
        assert not answers(own_url), "the run's own temporary server is still there"
    finally:
        if started_here:
            default.stop()
