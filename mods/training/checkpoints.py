"""Checkpoints of a training run: their files, the run they belong to (``run_fingerprint``:
a checkpoint of another run is never resumed) and the newest complete one. Writing one
is the training loop's job (``mods.training.process._save_checkpoint``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from mods.training.config import TrainConfig
    from mods.training.data import EncodedRow

CHECKPOINT_META = "mods_checkpoint.json"
# Bumped when the checkpoint layout or the meaning of a step changes: an old
# checkpoint is then ignored instead of being resumed into a different run.
CHECKPOINT_FORMAT = 2
# Only the newest checkpoint is kept: it is complete (renamed into place) before the
# previous one is deleted, so a complete one is always on disk.


def uses_fsdp(config: TrainConfig, processes: int) -> bool:
    """Full fine-tuning over several processes shards the model (FSDP); LoRA, and any
    training in one process, keeps a whole copy in each process (DDP)."""
    return config.method == "full" and processes > 1


def checkpoint_layout(config: TrainConfig, processes: int) -> str:
    """How a checkpoint's files depend on the process count. A replicated (DDP or single
    process) checkpoint holds one copy of the weights, optimiser and scheduler, and
    nothing else a resume needs from the process count: the data order and the
    micro-batches of a step come from ``global_batch``, and every micro-batch seeds its
    own dropout. So a worker with another number of GPUs resumes it. FSDP writes one
    shard per process: only the same count can load it."""
    return f"fsdp-{processes}" if uses_fsdp(config, processes) else "replicated"


def run_fingerprint(model_path: str, encoded: Sequence[EncodedRow], config: TrainConfig, processes: int,
                    mixed_precision: str) -> str:
    """What a checkpoint must match to be resumed: the base model, the token ids, every
    setting that changes the weights, the checkpoint layout (``checkpoint_layout``) and
    the resolved precision. Not the device, the checkpoint interval, nor the process
    count beyond the layout (it does not change the weights)."""
    digest = hashlib.sha256()
    settings = config.model_dump(mode="json", exclude={"device", "processes", "checkpoint_every", "gradient_checkpointing"})
    digest.update(json.dumps({"format": CHECKPOINT_FORMAT, "model": str(model_path), "config": settings,
                              "layout": checkpoint_layout(config, processes), "mixed_precision": mixed_precision},
                             sort_keys=True).encode())
    for row in encoded:
        digest.update(len(row.input_ids).to_bytes(4, "little"))
        digest.update(torch.tensor(row.input_ids, dtype=torch.int32).numpy().tobytes())
        digest.update(torch.tensor(row.labels, dtype=torch.int32).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(checkpoint_dir: Path | None, fingerprint: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of this run, or None.

    Complete means renamed into place (``step-*``; a save in progress is ``.tmp-*``)
    with its ``mods_checkpoint.json``; a checkpoint of another run (other rows, other
    settings) is never resumed.
    """
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return None
    found: list[tuple[int, Path, dict[str, Any]]] = []
    for folder in checkpoint_dir.glob("step-*"):
        meta_path = folder / CHECKPOINT_META
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("fingerprint") == fingerprint and isinstance(meta.get("step"), int):
            found.append((meta["step"], folder, meta))
    if not found:
        return None
    step, folder, meta = max(found, key=lambda item: item[0])
    return folder, meta
