"""Docker for tests: an engine (this machine's, or one the tests start and stop), the
base images made from Debian's packages, the mods image, and compose.

    with docker_engine() as engine:      # starts dockerd (vfs) as root when none answers
        image, seconds = build_image("mods:test-cpu")
        with ComposeStack.up(...) as stack:
            ...

Without a GPU, an engine started here finds tests/bin/nvidia-container-runtime-hook on its
PATH (unless a real one is installed): Docker then accepts a GPU device request and starts
the container without a device. `.ci/run` installs docker.io, docker-compose and debootstrap.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STANDIN_HOOK_DIR = Path(__file__).resolve().parent / "bin"
# Made by docker/make-base-images.sh from Debian's packages (no public image registry here);
# elsewhere set MODS_TEST_BASE_IMAGE=python:3.11-slim and MODS_TEST_POSTGRES_IMAGE=postgres:16.
BASE_IMAGE = os.environ.get("MODS_TEST_BASE_IMAGE", "mods-base:bookworm")
POSTGRES_IMAGE = os.environ.get("MODS_TEST_POSTGRES_IMAGE", "mods-postgres:bookworm")


class DockerUnavailable(RuntimeError):
    """No engine answers and none can be started here (no dockerd, not root)."""


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    with contextlib.suppress(subprocess.TimeoutExpired):
        return docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False).returncode == 0
    return False


@contextlib.contextmanager
def docker_engine(log_dir: Path) -> Iterator[None]:
    """This machine's engine if one answers; else dockerd started here (vfs storage: the
    default driver does not work in some sandboxes), stopped at the end."""
    if _engine_answers():
        yield
        return
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        raise DockerUnavailable("no Docker engine answers and none can be started here (needs root and dockerd: "
                                "apt-get install docker.io; .ci/run does)")
    env = dict(os.environ)
    if shutil.which("nvidia-container-runtime-hook") is None:
        env["PATH"] = f"{STANDIN_HOOK_DIR}:{env['PATH']}"
    log = (log_dir / "dockerd.log").open("w")
    process = subprocess.Popen(["dockerd", "--storage-driver=vfs"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not _engine_answers():
            if process.poll() is not None or time.monotonic() > deadline:
                raise DockerUnavailable(f"dockerd did not start:\n{(log_dir / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def image_exists(name: str) -> bool:
    return docker("image", "inspect", name, check=False).returncode == 0


def ensure_base_images() -> None:
    """The Debian-made base and PostgreSQL images, and docker/local/ (about 2 min the first time)."""
    if BASE_IMAGE == "mods-base:bookworm" or POSTGRES_IMAGE == "mods-postgres:bookworm":
        subprocess.run([str(ROOT / "docker" / "make-base-images.sh")], check=True, timeout=900,
                       env={**os.environ, "MODS_BASE_IMAGE": BASE_IMAGE, "MODS_POSTGRES_IMAGE": POSTGRES_IMAGE})


def build_image(tag: str, log: Path) -> float:
    """docker build of docker/Dockerfile (CPU torch from docker/local/wheels); returns seconds.

    The build stage is tagged too (``<tag>-build``), so that its dependency layer stays
    cached; the images the new tags replace are removed (on vfs each is gigabytes)."""
    started = time.monotonic()
    common = ["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
              # torch from the wheel in docker/local (the CPU index is not reachable here)
              "--build-arg", "TORCH_INDEX_URL=", "-f", "docker/Dockerfile"]
    with log.open("w") as out:
        for args in (["--target", "build", "-t", f"{tag}-build"], ["-t", tag]):
            result = subprocess.run([*common, *args, "."], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=2400)
            if result.returncode != 0:
                raise RuntimeError(f"docker build failed:\n{log.read_text()[-4000:]}")
    docker("image", "prune", "-f", timeout=600)
    return time.monotonic() - started


def image_size_mb(tag: str) -> float:
    return int(docker("image", "inspect", tag, "--format", "{{.Size}}").stdout.strip()) / 1e6


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where installed, else Debian's docker-compose 1.29."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise DockerUnavailable("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")


class ComposeStack:
    """docker/compose.yaml under a project name of its own, with an env file of the test's."""

    def __init__(self, project: str, env_file: Path, log_dir: Path) -> None:
        self.project = project
        self.env_file = env_file
        self.log_dir = log_dir
        self.base = [*compose_command(), "-p", project, "--env-file", str(env_file),
                     "-f", str(ROOT / "docker" / "compose.yaml")]

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        # Creating a container copies its whole image on vfs: minutes on a busy machine,
        # longer than compose's default 60 s HTTP timeout.
        env = {**os.environ, "COMPOSE_HTTP_TIMEOUT": str(int(timeout))}
        result = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                env=env)
        if check and result.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)}: exit {result.returncode}\n{result.stdout[-2000:]}\n"
                               f"{result.stderr[-3000:]}")
        return result

    def container(self, service: str) -> str:
        """The id of the service's (first) container."""
        ids = self.run("ps", "-q", service).stdout.split()
        if not ids:
            raise RuntimeError(f"no container for {service}")
        return ids[0]

    def inspect(self, service: str) -> dict:
        return json.loads(docker("inspect", self.container(service)).stdout)[0]

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "60", check=False, timeout=60).stdout[-6000:]

    @classmethod
    @contextlib.contextmanager
    def up(cls, project: str, env: dict[str, str], log_dir: Path) -> Iterator["ComposeStack"]:
        env_file = log_dir / "compose.env"
        env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
        stack = cls(project, env_file, log_dir)
        try:
            stack.run("up", "-d", "--no-build", timeout=900)
            yield stack
        finally:
            (log_dir / "compose.log").write_text(stack.run("logs", "--no-color", check=False, timeout=120).stdout)
            stack.run("down", "-v", "--remove-orphans", "-t", "5", check=False, timeout=300)
