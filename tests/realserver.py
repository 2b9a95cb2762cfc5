"""A real Prefect stack for tests: PostgreSQL from the machine's packages, `prefect server
start` with an auth string on it, and `prefect worker` processes, all on 127.0.0.1.

Everything lives in one temporary folder and every process it starts is stopped by
``RealStack.close()`` (descendants included: the process worker runs each flow run in a
process group of its own), also when a test fails.

    with RealStack.start(heartbeat_seconds=30, crash_after_seconds=45) as stack:
        stack.start_worker("mods-cpu"); stack.start_worker("mods-gpu")
        ...  # the test process talks to the server: stack.settings() is active inside

Set ``MODS_REALSERVER_KEEP=1`` to keep the folder (logs, database) after the stack stops.

PostgreSQL: ``initdb``/``pg_ctl`` from ``$MODS_PG_BIN`` or the newest
``/usr/lib/postgresql/*/bin`` (Debian's ``postgresql`` package; ``.ci/run`` installs it).
initdb refuses to run as root, so as root the database runs as the ``postgres`` user
(created by the package) via ``runuser``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


class StackUnavailable(RuntimeError):
    """The machine cannot run the stack (no PostgreSQL binaries, no user to run them)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """Where initdb/pg_ctl are: $MODS_PG_BIN, the newest Debian version folder, or $PATH."""
    if os.environ.get("MODS_PG_BIN"):
        return Path(os.environ["MODS_PG_BIN"])
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"({path} unreadable)"


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Prefect API target (each process gets its own)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API_", "PREFECT_SERVER_API_", "PREFECT_HOME"))}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def drain_prefect_services(timeout: float = 30) -> None:
    """Finish and stop this process's Prefect client services (events, logs, concurrency-slot
    leases). Each keeps the client of the API it first talked to: left running after that
    server is gone, it sends there for the rest of the process, and the next server's flows
    (a test harness started later in the same test process) fail with "Unable to acquire
    concurrency slots". Call it while the server still answers."""
    from prefect._internal.concurrency.services import _QueueServiceBase

    with contextlib.suppress(Exception):  # a service that cannot finish is stopped all the same
        _QueueServiceBase.drain_all(timeout=timeout, at_exit=False)


class Managed:
    """A process we started (in its own session), stopped with all its descendants."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.log = log
        self._log_file = open(log, "ab")
        self.process = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_hard(self) -> list[int]:
        """kill -9 the process and every descendant (a lost machine); returns the pids killed."""
        procs = self.tree()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
        self.process.wait(timeout=10)
        self._log_file.close()
        return [p.pid for p in procs]

    def stop(self, timeout: float = 20) -> None:
        procs = self.tree()  # before the parent dies: orphans would be re-parented out of reach
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(alive, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if not self._log_file.closed:
            self._log_file.close()


class Postgres:
    """A throw-away PostgreSQL cluster in ``root``, on 127.0.0.1:port only, password auth."""

    def __init__(self, root: Path, port: int) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None or not (bin_dir / "initdb").is_file():
            raise StackUnavailable("PostgreSQL binaries not found (install Debian's 'postgresql' package, "
                                   "or set MODS_PG_BIN to the folder holding initdb and pg_ctl)")
        self.bin = bin_dir
        self.root = root
        self.port = port
        self.user = "prefect"
        self.password = secrets.token_hex(12)
        self.database = "prefect"
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            account = next((a for a in ("postgres", "nobody") if _user_exists(a)), None)
            if account is None or shutil.which("runuser") is None:
                raise StackUnavailable("running as root: initdb needs a non-root account ('postgres') and runuser")
            self.run_as = ["runuser", "-u", account, "--"]
            shutil.chown(root, user=account)
        root.chmod(0o700)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.user}:{self.password}@{HOST}:{self.port}/{self.database}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        result = subprocess.run([*self.run_as, *args], capture_output=True, text=True, timeout=timeout,
                                env=_clean_env(), cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout)[-1500:]}\n{_tail(self.log)}")

    def start(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.run_as:
            shutil.chown(pwfile, user=self.run_as[2])
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        options = (f"-c listen_addresses={HOST} -p {self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off -c max_connections=200")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "120", "start")
        env = _clean_env(PGPASSWORD=self.password)
        result = subprocess.run([str(self.bin / "createdb"), "-h", HOST, "-p", str(self.port), "-U", self.user,
                                 self.database], capture_output=True, text=True, env=env, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"createdb failed: {result.stderr[-1500:]}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class RealStack:
    """Postgres + `prefect server start` (auth string) + deployments + workers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.auth = f"mods:{secrets.token_hex(8)}"
        (root / "pg").mkdir()
        self.postgres = Postgres(root / "pg", free_port())
        self.server: Managed | None = None
        self.workers: dict[str, Managed] = {}
        self._settings: contextlib.ExitStack | None = None

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    def client_env(self, home: Path) -> dict[str, str]:
        return _clean_env(PREFECT_API_URL=self.api_url, PREFECT_API_AUTH_STRING=self.auth, PREFECT_HOME=str(home))

    # ---------------------------------------------------------------- server

    def start_server(self, timeout: float = 240) -> float:
        """Start (or restart) the server on the same port and database; returns seconds to healthy."""
        home = self.root / "server-home"
        home.mkdir(exist_ok=True)
        env = _clean_env(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=self.postgres.url,
                         PREFECT_SERVER_API_AUTH_STRING=self.auth, PREFECT_SERVER_LOGGING_LEVEL="WARNING",
                         # the UI's API address: `--port` alone leaves it at the default 4200
                         PREFECT_UI_API_URL=self.api_url)
        started = time.monotonic()
        self.server = Managed("server", [sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                                         "--port", str(self.port)], env, self.root / "server.log")
        deadline = started + timeout
        while time.monotonic() < deadline:
            if not self.server.alive():
                raise RuntimeError(f"prefect server exited ({self.server.process.returncode}):\n"
                                   f"{_tail(self.server.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - started
            time.sleep(1)
        raise RuntimeError(f"prefect server not healthy after {timeout:.0f} s:\n{_tail(self.server.log)}")

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    # ---------------------------------------------------------------- workers

    def start_worker(self, pool: str, name: str | None = None, limit: int | None = None,
                     worker_type: str = "process", **extra_env: str) -> Managed:
        name = name or f"{pool}-{len(self.workers)}"
        home = self.root / f"home-{name}"
        home.mkdir(exist_ok=True)
        env = self.client_env(home)
        env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
        env["PREFECT_WORKER_HEARTBEAT_SECONDS"] = "5"
        env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the log says what each flow run did
        env.update(extra_env)
        args = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", worker_type,
                "--name", name]
        if limit is not None:
            args += ["--limit", str(limit)]
        worker = Managed(name, args, env, self.root / f"{name}.log")
        self.workers[name] = worker
        return worker

    def worker_logs(self) -> str:
        return "\n".join(f"--- {name}.log\n{_tail(w.log)}" for name, w in self.workers.items())

    # ---------------------------------------------------------------- lifetime

    @classmethod
    @contextlib.contextmanager
    def start(cls, **deploy_args: Any) -> Iterator["RealStack"]:
        """Postgres, the server, this process's Prefect settings pointing at it, deploy_all()."""
        root = Path(tempfile.mkdtemp(prefix="mods-realserver-"))  # in /tmp: the postgres user can enter it
        root.chmod(0o755)
        stack: RealStack | None = None
        try:
            stack = cls(root)
            stack.postgres.start()
            stack.start_server()
            with stack.settings():
                from deployments.deploy import deploy_all

                deploy_all(**deploy_args)
                yield stack
        finally:
            if stack is not None:
                stack.close()
            if os.environ.get("MODS_REALSERVER_KEEP"):  # debugging: logs and database stay
                print(f"real-server stack kept in {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url, PREFECT_API_AUTH_STRING: self.auth}):
            yield

    def close(self) -> None:
        drain_prefect_services()
        for worker in self.workers.values():
            worker.stop()
        self.stop_server()
        self.postgres.stop()
