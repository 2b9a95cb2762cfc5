"""How a model is fine-tuned (``TrainConfig``: the ``seed_training``/``final_training``
blocks of the configuration) and what one training process is handed (``TrainJob``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["lora", "full"] = Field(
        "lora", description="'lora' (peft adapter) or 'full' fine-tuning (the paper; GPU)."
    )
    epochs: float = Field(2.0, gt=0, description="Passes over the training rows (paper: 3).")
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate (paper, full fine-tuning: 2e-5; LoRA: ~1e-4–3e-4)."
    )
    batch_size: int = Field(
        8, ge=1, description="Rows per micro-batch (one forward pass of one process): memory, not the result."
    )
    global_batch: int = Field(
        8, ge=1, validate_default=True,  # checked against batch_size even when left at its default
        description="Rows per optimiser step over all processes (paper: 128); a multiple of batch_size. "
                    "The same for any number of processes.",
    )
    max_length: int = Field(384, ge=16, description="Tokens per row (prompt + answer); longer rows are cut.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps with linear warm-up (paper: 0.03).")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up (paper: cosine).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: list[str] = Field(
        default=["q_proj", "v_proj"],
        description="Module names that get LoRA adapters ('all-linear' for every linear layer).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto': bf16 mixed precision where the CPU/GPU supports it, else fp32."
    )
    seed: int = Field(0, description="Seed for batch order, dropout and adapter initialisation.")
    device: str | None = Field(None, description="'cpu', 'cuda', or empty for automatic.")
    processes: int | None = Field(
        None, ge=1,
        description="Training processes (DDP; FSDP for 'full'): speed only, the same update for any number. "
                    "Empty: every visible GPU on CUDA, 1 on CPU.",
    )
    checkpoint_every: int = Field(
        100, ge=0,
        description="Save a resumable checkpoint every N optimiser steps (0: never).",
    )
    gradient_checkpointing: bool = Field(
        # On by default: without it the activations kept the demo's CPU final training at
        # 4,684 MiB even with the other memory changes (2,284 MiB with it, for ~25 % more
        # CPU time: docs/training.md, *Memory*); it does not change the weights.
        True, description="Recompute activations in the backward pass: less memory, more compute "
                          "(the same weights either way)."
    )

    @field_validator("global_batch")
    @classmethod
    def _whole_micro_batches(cls, value: int, info: ValidationInfo) -> int:
        # A step is whole micro-batches: otherwise its rows would depend on how they are split.
        batch_size = info.data.get("batch_size")
        if batch_size is not None and value % batch_size:
            fits = math.ceil(value / batch_size) * batch_size
            raise ValueError(f"global_batch={value} is not a multiple of batch_size={batch_size}; "
                             f"set global_batch to a multiple of batch_size, e.g. {fits}")
        return value


class TrainJob(BaseModel):
    """Everything one training process needs (written as JSON for launched processes)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str  # as the caller named it (goes into mods_model.json)
    model_path: str  # the local folder
    config: TrainConfig
    out_dir: Path
    checkpoint_dir: Path | None
    progress: bool
    processes: int
    rows: int
    pad_id: int
    fingerprint: str
    work_dir: Path | None = None  # launched runs: tokens.parquet, tokenizer/, summary.json
