"""Fine-tuning the base LLM on selected rows (seed training and final training).

LoRA (peft) by default, so a 2-core CPU can run the method end to end; ``method="full"``
is the paper's full fine-tuning for GPU runs. One training loop on ``accelerate``: the
same code runs in this process (one CPU or one GPU) or in ``train.processes`` processes
that ``train_model`` starts itself (DDP; FSDP full sharding for ``method="full"``), with
length-grouped batches (little padding), prompt tokens masked out of the loss, bf16
mixed precision where the hardware has it, gradient accumulation, gradient checkpointing
(on by default), and ``save_state`` checkpoints that a rerun resumes from.

The pieces: ``mods.training.data`` (rows to token ids, the loss mask, padding),
``mods.training.loss`` (the loss, without vocabulary-wide logits for prompt tokens),
``mods.training.plan`` (which micro-batch each process runs at each optimiser step: the
batch semantics), ``mods.training.checkpoints`` (which checkpoint a run may resume),
``mods.training.process`` (the loop every training process runs) and ``mods.training.launch``
(starting several processes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mods.core.faults import is_out_of_memory, release_accelerator_memory
from mods.models.loading import load_causal_lm, pick_device, resolve_model_path
from mods.training.checkpoints import run_fingerprint
from mods.training.config import TrainConfig, TrainJob
from mods.training.data import encode_rows
from mods.training.launch import launch_training
from mods.training.plan import idle_slots_warning, resolve_processes
from mods.training.process import TRAINED_MODEL_META, autocast_dtype, run_training_process

log = logging.getLogger("mods.training.train")


def _reset_accelerate_state() -> None:
    """accelerate keeps its state in process-wide singletons; an in-process run starts
    and ends with a clean one, so runs with other settings can follow."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_model(
    base_model: str,
    rows: pd.DataFrame,
    config: TrainConfig,
    out_dir: Path,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``base_model`` on ``rows`` (instruction, input, output; a conversation row's
    ``messages``: ``mods.training.data``) and save to ``out_dir``.

    Saves a peft adapter (LoRA) or a full model, plus ``mods_model.json`` naming the base
    model, so ``load_trained_model`` can rebuild it on any machine that has that base.
    With ``resolve_processes(config) > 1`` it starts that many processes itself and waits
    (a failed process raises ``TrainingProcessError`` with its last log lines). With a
    ``checkpoint_dir`` it saves a checkpoint every ``config.checkpoint_every`` optimiser
    steps and resumes from the newest complete one of the same run; it never deletes
    ``checkpoint_dir`` (the caller does, once the artifact is complete).
    Returns a summary (steps, tokens, tokens/s, losses, processes, global batch, ...).
    The number of processes changes the speed, not the update; when it leaves slots of
    every step idle (it does not divide ``global_batch / batch_size``) a warning says so.
    """
    from transformers import AutoTokenizer

    if len(rows) == 0:
        raise ValueError("no rows to train on: the selection is empty")
    processes = resolve_processes(config)
    idle = idle_slots_warning(config, processes)
    if idle is not None:
        log.warning("train: %s", idle)
    model_path = resolve_model_path(base_model, field="base_model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = encode_rows(tokenizer, rows, config.max_length)

    amp = autocast_dtype(config.precision, pick_device(config.device))
    job = TrainJob(
        base_model=base_model,
        model_path=str(model_path),
        config=config,
        out_dir=Path(out_dir).resolve(),
        checkpoint_dir=Path(checkpoint_dir).resolve() if checkpoint_dir is not None else None,
        progress=progress,
        processes=processes,
        rows=len(rows),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        fingerprint=run_fingerprint(str(model_path), encoded, config, processes, "bf16" if amp else "no"),
    )
    if processes == 1:
        _reset_accelerate_state()
        try:
            summary = run_training_process(job, encoded, tokenizer)
        finally:
            _reset_accelerate_state()
        assert summary is not None
        return summary

    return launch_training(job, encoded, tokenizer)


def load_trained_model(model_dir: str | Path, device: str | None = None,
                       dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """A model saved by ``train_model``, ready for inference (LoRA merged into the weights,
    which makes generation as fast as the base model), in ``dtype`` (fp32 when None)."""
    model_dir = Path(model_dir)
    meta_path = model_dir / TRAINED_MODEL_META
    if not meta_path.is_file():
        # Any plain HF causal-LM folder works as well.
        return load_causal_lm(model_dir, device=device, dtype=dtype)
    meta = json.loads(meta_path.read_text())
    if meta["method"] == "full":
        return load_causal_lm(model_dir, device=device, dtype=dtype)
    from peft import PeftModel

    model, tokenizer = load_causal_lm(resolve_model_path(meta["base_model"]), device=device, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
    model.eval()
    return model, tokenizer


def smaller_batch_size(config: TrainConfig) -> int | None:
    """The batch size to retry with after running out of memory: the largest divisor of
    ``global_batch`` that is at most half of ``batch_size`` (the same global batch, so
    the same update); None at ``batch_size`` 1."""
    if config.batch_size <= 1:
        return None
    half = config.batch_size // 2
    return max(size for size in range(1, half + 1) if config.global_batch % size == 0)


def train_fitting_memory(base_model: str, rows: pd.DataFrame, config: TrainConfig, out_dir: Path,
                         checkpoint_root: Path, progress: Any = True) -> dict[str, Any]:
    """``train_model``, retried with a smaller ``batch_size`` (``smaller_batch_size``) each
    time it runs out of memory. Each batch size checkpoints in a folder of its own under
    ``checkpoint_root`` (another batch size is another run). The training stages and
    ``mods train`` both call this."""
    while True:
        try:
            return train_model(base_model, rows, config, out_dir, progress=progress,
                               checkpoint_dir=Path(checkpoint_root) / f"checkpoints-b{config.batch_size}")
        except BaseException as error:  # noqa: BLE001 - only out-of-memory is handled
            smaller = smaller_batch_size(config)
            if not is_out_of_memory(error) or smaller is None:
                raise
            release_accelerator_memory()
            # Same global batch (the same update), fewer rows per forward pass.
            config = config.model_copy(update={"batch_size": smaller})
            log.warning("training ran out of memory; retrying with batch_size=%d (global_batch=%d unchanged)",
                        config.batch_size, config.global_batch)
