"""Docker for tests: an engine (this machine's, or one the tests start and stop), the
base images made from Debian's packages, the mods image, and compose.

    engine = DockerEngine(log_dir).start()   # dockerd started as root when none answers
    before = DockerState(test_images)
    seconds = build_image("mods:test-cpu", log)
    with ComposeStack.up(...) as stack:
        ...
    left = clean_up(before, remove_images, keep_images); engine.stop()

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

import psutil

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


def storage_drivers() -> list[str]:
    """The storage drivers to try for an engine started here, best first: fuse-overlayfs
    (copy-on-write: a container or a build step shares its image's files) where FUSE is
    there, then vfs (every layer and every container a full copy of its image; the one
    driver that always works in a sandbox). MODS_TEST_DOCKER_STORAGE picks one."""
    if os.environ.get("MODS_TEST_DOCKER_STORAGE"):
        return [os.environ["MODS_TEST_DOCKER_STORAGE"]]
    drivers = []
    if shutil.which("fuse-overlayfs") and Path("/dev/fuse").exists():
        drivers.append("fuse-overlayfs")
    return [*drivers, "vfs"]


def engine_processes() -> list[psutil.Process]:
    """The engine's processes on this machine: dockerd, containerd and their shims, the
    fuse-overlayfs mounts of running containers."""
    names = {"dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "fuse-overlayfs"}
    found = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["name"] in names and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


class DockerEngine:
    """This machine's engine if one answers (left as it is); else dockerd started here with
    the first storage driver of ``storage_drivers()`` that starts and runs a container, and
    stopped by ``stop()`` with every process it started."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.process: subprocess.Popen | None = None
        self.driver = ""
        self._log = None

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def start(self, drivers: list[str] | None = None) -> "DockerEngine":
        if _engine_answers():
            self.driver = docker("info", "--format", "{{.Driver}}").stdout.strip()
            return self
        if shutil.which("dockerd") is None or os.geteuid() != 0:
            raise DockerUnavailable("no Docker engine answers and none can be started here (needs root and dockerd: "
                                    "apt-get install docker.io; .ci/run does)")
        failures = []
        for driver in drivers or storage_drivers():
            try:
                self._start_dockerd(driver)
                return self
            except DockerUnavailable as error:
                failures.append(f"{driver}: {error}")
        raise DockerUnavailable("dockerd did not start with any storage driver:\n" + "\n".join(failures))

    def _start_dockerd(self, driver: str) -> None:
        env = dict(os.environ)
        if shutil.which("nvidia-container-runtime-hook") is None:
            env["PATH"] = f"{STANDIN_HOOK_DIR}:{env['PATH']}"
        log_path = self.log_dir / f"dockerd-{driver}.log"
        self._log = log_path.open("w")
        self.process = subprocess.Popen(["dockerd", f"--storage-driver={driver}"], env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while not _engine_answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DockerUnavailable(log_path.read_text()[-1500:])
            time.sleep(1)
        self.driver = driver

    def runs_containers(self, image: str) -> bool:
        """A container of ``image`` starts and exits 0 (a driver can start, then fail to mount)."""
        return docker("run", "--rm", "--network", "none", image, "true", timeout=300, check=False).returncode == 0

    def fall_back(self) -> None:
        """Restart the engine started here with the next storage driver (images are per driver)."""
        drivers = storage_drivers()
        rest = drivers[drivers.index(self.driver) + 1:] if self.driver in drivers else []
        if not self.started_here or not rest:
            raise DockerUnavailable(f"the engine ({self.driver}) cannot run a container, and there is no other "
                                    f"storage driver to try")
        self.stop()
        self.start(rest)

    def stop(self) -> None:
        """Stop dockerd started here; raise if a process of the engine outlives it."""
        if self.process is None:
            return
        process, self.process = self.process, None
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._log is not None:
            self._log.close()
        _, alive = psutil.wait_procs(engine_processes(), timeout=30)
        if alive:
            raise RuntimeError(f"engine processes left after dockerd stopped: {[p.pid for p in alive]}")


# Compose projects of the tests are named with this prefix (their containers, volumes and
# networks too): what the clean-up may remove on an engine that also serves other work.
TEST_PROJECT_PREFIX = "mods-test-"


class DockerState:
    """What the engine holds that a test may have made: containers of the tests' compose
    projects or of the given images, volumes (named after a test project, or anonymous),
    networks of a test project, and every image layer (by id)."""

    def __init__(self, test_images: tuple[str, ...] = ()) -> None:
        self.containers = set()
        listing = docker("ps", "-a", "--no-trunc", "--format",
                         '{{.ID}}\t{{.Image}}\t{{.Label "com.docker.compose.project"}}').stdout
        for line in listing.splitlines():
            container, image, project = (line.split("\t") + ["", ""])[:3]
            if project.startswith(TEST_PROJECT_PREFIX) or image in test_images:
                self.containers.add(container)
        self.volumes = {v for v in docker("volume", "ls", "-q").stdout.split()
                        if v.startswith(TEST_PROJECT_PREFIX) or (len(v) == 64 and all(c in "0123456789abcdef" for c in v))}
        self.networks = {n for n in docker("network", "ls", "--format", "{{.Name}}").stdout.split()
                         if n.startswith(TEST_PROJECT_PREFIX)}
        self.images = set(docker("images", "-aq", "--no-trunc").stdout.split())


def _image_chain(tag: str) -> set[str]:
    """The image and every layer image it is built on (the classic builder's parent chain)."""
    chain, current = set(), tag
    while current:
        found = docker("image", "inspect", current, "--format", "{{.Id}} {{.Parent}}", check=False)
        if found.returncode != 0:
            break
        image_id, _, parent = found.stdout.strip().partition(" ")
        chain.add(image_id)
        current = parent.strip()
    return chain


def clean_up(before: DockerState, remove_images: tuple[str, ...], keep_images: tuple[str, ...]) -> list[str]:
    """Remove what the tests made since ``before``: their containers (compose projects named
    ``mods-test-*``, containers of ``remove_images``), volumes and networks, the
    ``remove_images`` tags and dangling layers. Returns what of that kind is still there
    beyond ``before`` and the layers of ``keep_images`` (the build cache), so a caller can
    fail on it. Nothing else of the engine's is touched."""
    now = DockerState(remove_images)
    for container in now.containers - before.containers:
        docker("rm", "-f", "-v", container, check=False, timeout=300)
    for volume in now.volumes - before.volumes:
        docker("volume", "rm", volume, check=False)  # one still in use stays, and is reported
    for network in now.networks - before.networks:
        docker("network", "rm", network, check=False)
    for tag in remove_images:
        docker("rmi", "-f", tag, check=False, timeout=600)
    docker("image", "prune", "-f", check=False, timeout=600)
    after = DockerState(remove_images)
    kept = set().union(*(_image_chain(tag) for tag in keep_images)) if keep_images else set()
    left = [f"container {c[:12]}" for c in after.containers - before.containers]
    left += [f"volume {v}" for v in after.volumes - before.volumes]
    left += [f"network {n}" for n in after.networks - before.networks]
    left += [f"image {i}" for i in after.images - before.images - kept]
    return left


def docker_disk_mb(root: Path = Path("/var/lib/docker")) -> float:
    """Disk used under the engine's data root (``du``: what the layers really take)."""
    result = subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True, timeout=600)
    return float(result.stdout.split()[0]) if result.returncode == 0 and result.stdout else float("nan")


def ensure_base_images() -> None:
    """The Debian-made base and PostgreSQL images, and docker/local/ (about 2 min the first time)."""
    if BASE_IMAGE == "mods-base:bookworm" or POSTGRES_IMAGE == "mods-postgres:bookworm":
        subprocess.run([str(ROOT / "docker" / "make-base-images.sh")], check=True, timeout=900,
                       env={**os.environ, "MODS_BASE_IMAGE": BASE_IMAGE, "MODS_POSTGRES_IMAGE": POSTGRES_IMAGE})


def build_image(tag: str, log: Path) -> float:
    """docker build of docker/Dockerfile (CPU torch from docker/local/wheels); returns seconds.

    Three tags: ``<tag>`` the runtime (no packaged models: what the container tests run),
    ``<tag>-full`` the default target (runtime + the prepared models), and ``<tag>-build``
    the build stage, kept so that its dependency layer stays cached. The layers that the
    new tags replace are removed (dangling)."""
    started = time.monotonic()
    common = ["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
              # torch from the wheel in docker/local (the CPU index is not reachable here)
              "--build-arg", "TORCH_INDEX_URL=", "-f", "docker/Dockerfile"]
    with log.open("w") as out:
        for args in (["--target", "build", "-t", f"{tag}-build"], ["--target", "runtime", "-t", tag],
                     ["-t", f"{tag}-full"]):
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
            from realserver import drain_prefect_services

            drain_prefect_services()  # while the stack's server answers: nothing of this process sends to it after
            (log_dir / "compose.log").write_text(stack.run("logs", "--no-color", check=False, timeout=120).stdout)
            stack.run("down", "-v", "--remove-orphans", "-t", "5", check=False, timeout=300)
