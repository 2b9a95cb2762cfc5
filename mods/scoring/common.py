"""What every quality scorer shares: input checks, the identity of a model folder
(``model_hash``), the compute precision, length-sorted batches, and the base class of the
scorers that combine per-row features into ``quality_score``."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch


def check_lengths(instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> int:
    n = len(instructions)
    if len(inputs) != n or len(outputs) != n:
        raise ValueError(f"instructions, inputs, outputs differ in length: {n}, {len(inputs)}, {len(outputs)}")
    return n


def turn_contexts(contexts: Sequence[Sequence[Any]] | None, n: int) -> list[list[Any]]:
    """Each row's conversation before its user turn ([]: a single exchange)."""
    if contexts is None:
        return [[] for _ in range(n)]
    if len(contexts) != n:
        raise ValueError(f"{len(contexts)} contexts for {n} rows")
    return [list(c) for c in contexts]


def as_text(x: Any) -> str:
    # None / NaN from pandas mean "no input".
    if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)):
        return ""
    return str(x)


def model_hash(path: Path) -> str:
    """Cheap identity of a model folder: config + tokenizer files in full, weight files by
    name, size and first 4 MiB (hashing 0.5 GB of weights on every run would cost seconds)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f.name.encode())
        if f.suffix in {".safetensors", ".bin", ".pt", ".gguf", ".h5", ".msgpack"}:
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(4 << 20))
        else:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype actually used (part of the fingerprint: it changes scores slightly)."""
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        # Emulated bf16 (no AVX512-BF16/AMX) is slower than float32.
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
            torch.cpu, "_is_amx_tile_supported", lambda: False
        )()
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def scoring_autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so a memory
    problem shows up at once rather than at the end)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class FeatureScorer:
    """A scorer that computes features per row, then combines them into quality_score."""

    def features(self, instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str],
                 progress: bool = True, contexts: Sequence[Sequence[Any]] | None = None) -> pd.DataFrame:
        raise NotImplementedError

    def combine(self, features: pd.DataFrame) -> pd.Series:
        raise NotImplementedError

    def score(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        progress: bool = True,
        contexts: Sequence[Sequence[Any]] | None = None,
    ) -> pd.DataFrame:
        feats = self.features(instructions, inputs, outputs, progress=progress, contexts=contexts)
        feats.insert(0, "quality_score", self.combine(feats))
        return feats

