"""Fine-tuning the base LLM on selected rows (seed training and final training).

LoRA (peft) by default, so a 2-core CPU can run the method end to end; ``method="full"``
is the paper's full fine-tuning for GPU runs. One training loop on ``accelerate``: the
same code runs in this process (one CPU or one GPU) or in ``train.processes`` processes
that ``train_model`` starts itself (DDP; FSDP full sharding for ``method="full"``), with
length-grouped batches (little padding), prompt tokens masked out of the loss, bf16
mixed precision where the hardware has it, gradient accumulation, optional gradient
checkpointing, and ``save_state`` checkpoints that a rerun resumes from.

Batch semantics (the README's *Training* section says the same): ``global_batch`` rows
per optimiser step, whatever the number of processes; ``processes`` only sets the speed.
The rows are cut into one seeded sequence of micro-batches of ``batch_size``
(length-grouped, reshuffled each epoch). Optimiser step ``s`` takes the next
``M = global_batch / batch_size`` of them. With ``P`` processes each process has
``A = ceil(M / P)`` slots per step: process ``r`` runs slots ``r·A … r·A + A - 1``; a slot
past ``M`` (``P`` does not divide ``M``), or past the run's last micro-batch (a short last
step), is padding: a micro-batch run with weight 0, so that every process takes part in
every collective. accelerate divides each loss by ``A`` and DDP/FSDP average gradients
over ``P``, so each real micro-batch's loss (mean over its answer tokens) is scaled by
``A·P / n``, ``n`` the real micro-batches of its step: the update is the mean of the
step's micro-batch losses for any ``P`` (and a short last step is not diluted by its
padding). 1 process and 2 processes at the same global batch compute the same update.
Dropout draws from a generator seeded per micro-batch, so it does not depend on which
process runs a micro-batch, nor on whether the run was resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from tqdm.auto import tqdm

from mods.core.faults import is_out_of_memory, release_accelerator_memory
from mods.prompts import answer_suffix, chat_prompt

log = logging.getLogger("mods.training")

TRAINED_MODEL_META = "mods_model.json"
CHECKPOINT_META = "mods_checkpoint.json"
# Bumped when the checkpoint layout or the meaning of a step changes: an old
# checkpoint is then ignored instead of being resumed into a different run.
# 2: global_batch instead of gradient_accumulation; a short last step is no longer
# diluted by its padding.
CHECKPOINT_FORMAT = 2
# Only the newest checkpoint is kept: it is complete (renamed into place) before the
# previous one is deleted, so a complete one is always on disk.


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
        False, description="Recompute activations in the backward pass: less memory, ~30 % more compute."
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


@dataclass
class EncodedRow:
    input_ids: list[int]
    labels: list[int]


def encode_rows(tokenizer: Any, frame: pd.DataFrame, max_length: int) -> list[EncodedRow]:
    """Prompt + answer + end-of-answer token; the loss sees only the answer.

    Over-long rows keep the end of the prompt (closest to the answer) and the start of
    the answer, at least a quarter of ``max_length`` for the answer.
    """
    suffix = answer_suffix(tokenizer)
    encoded: list[EncodedRow] = []
    for instruction, input_text, output in zip(frame["instruction"], frame["input"], frame["output"]):
        prompt_ids = tokenizer(chat_prompt(tokenizer, instruction, input_text), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(str(output) + suffix, add_special_tokens=False)["input_ids"]
        max_prompt = max_length - min(len(answer_ids), max(1, max_length // 4))
        if len(prompt_ids) > max_prompt:
            prompt_ids = prompt_ids[-max_prompt:]
        answer_ids = answer_ids[: max_length - len(prompt_ids)]
        encoded.append(EncodedRow(prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return encoded


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar length (little padding), in a seeded random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def collate(rows: Sequence[EncodedRow], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_supports_bf16() else None


def lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --- the plan: which micro-batch each process runs at each optimiser step --------------------


def resolve_processes(config: TrainConfig) -> int:
    """The number of training processes ``config`` asks for on this machine.

    Empty: every visible GPU when training on CUDA, else 1. Asking for more processes
    than visible GPUs on CUDA is an error (one process per GPU).
    """
    from mods.models import pick_device

    device = pick_device(config.device)
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if config.processes is None:
            return max(1, visible)
        if config.processes > visible:
            raise ValueError(f"train.processes={config.processes} but only {visible} GPU(s) are visible (one process per GPU)")
        return config.processes
    return config.processes or 1


def micro_batches_per_step(config: TrainConfig) -> int:
    """``M``: micro-batches per optimiser step, over all processes."""
    return config.global_batch // config.batch_size


def slots_per_process(config: TrainConfig, processes: int) -> int:
    """``A``: micro-batch slots per process per optimiser step (accelerate's accumulation steps)."""
    return math.ceil(micro_batches_per_step(config) / processes)


def idle_slots_per_step(config: TrainConfig, processes: int) -> int:
    """Padding slots in every full step: ``A·P - M`` (0 when ``P`` divides ``M``)."""
    return slots_per_process(config, processes) * processes - micro_batches_per_step(config)


def idle_slots_warning(config: TrainConfig, processes: int) -> str | None:
    """What to say when some processes idle in every step (``P`` does not divide ``M``,
    or ``P > M``), and which global batches would use every process; None otherwise."""
    idle = idle_slots_per_step(config, processes)
    if not idle:
        return None
    per_step = micro_batches_per_step(config)
    slots = slots_per_process(config, processes) * processes
    unit = config.batch_size * processes  # global batches that fill every process: multiples of this
    lower, upper = (per_step // processes) * unit, math.ceil(per_step / processes) * unit
    better = f"global_batch={upper}" if not lower else f"global_batch={lower} or {upper}"
    return (f"global_batch={config.global_batch} is {per_step} micro-batch(es) of batch_size={config.batch_size} "
            f"per step on {processes} processes: {idle} of {slots} slots per step idle (padding: the same update, "
            f"time lost); {better} would use every process")


@dataclass
class TrainingPlan:
    micro_batches: list[list[int]]  # row indices, in global order over all epochs
    per_epoch: int  # micro-batches in one epoch
    per_step: int  # M: micro-batches per optimiser step, over all processes
    accumulation: int  # A: slots per process per step
    processes: int  # P

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(len(self.micro_batches) / self.per_step))

    @property
    def idle_slots_per_step(self) -> int:
        return self.accumulation * self.processes - self.per_step

    def for_process(self, step: int, rank: int) -> list[int | None]:
        """Global micro-batch numbers process ``rank`` runs at optimiser step ``step``
        (``None``: a padding slot, past the step's ``M`` or past the run's last
        micro-batch, run with weight 0)."""
        first_slot = rank * self.accumulation
        slots = range(first_slot, first_slot + self.accumulation)
        return [step * self.per_step + slot if slot < self.per_step
                and step * self.per_step + slot < len(self.micro_batches) else None for slot in slots]

    def real_in_step(self, step: int) -> int:
        """Micro-batches of step ``step`` that are not padding (``M``, fewer in a short last step)."""
        return max(0, min(self.per_step, len(self.micro_batches) - step * self.per_step))

    def loss_weight(self, step: int, index: int | None) -> float:
        """The factor on a micro-batch's mean loss so that, after accelerate's division by
        ``A`` and the processes' gradient average over ``P``, the step's update is the
        mean over its real micro-batches: ``A·P / n``; 0 for padding."""
        if index is None:
            return 0.0
        return self.accumulation * self.processes / self.real_in_step(step)


def training_plan(lengths: Sequence[int], config: TrainConfig, processes: int) -> TrainingPlan:
    """Every micro-batch of the run in order: epoch ``e`` is ``length_grouped_batches``
    with seed ``seed + e``; a fractional last epoch is cut. The order and the steps do
    not depend on ``processes``; only which process runs which micro-batch does."""
    per_epoch = len(length_grouped_batches(lengths, config.batch_size, config.seed))
    total = max(1, round(per_epoch * config.epochs))
    micro_batches: list[list[int]] = []
    epoch = 0
    while len(micro_batches) < total:
        micro_batches += length_grouped_batches(lengths, config.batch_size, config.seed + epoch)
        epoch += 1
    return TrainingPlan(micro_batches[:total], per_epoch, micro_batches_per_step(config),
                        slots_per_process(config, processes), processes)


def micro_batch_seed(seed: int, index: int) -> int:
    """Dropout seed of micro-batch ``index``: the same whichever process runs it."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


# --- checkpoints ------------------------------------------------------------------------------


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


def _fsync_tree(folder: Path) -> None:
    """Flush a checkpoint to disk before its rename makes it count as complete."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- one training process ---------------------------------------------------------------------


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


def _trainable_checksum(model: Any, accelerator: Any, sharded: bool) -> float:
    """Sum of the trainable weights: proves that a checkpoint really loaded (the LoRA
    weights are loaded non-strictly, as the frozen base is not saved)."""
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for param in model.parameters():
        if param.requires_grad:
            local = param.to_local() if hasattr(param, "to_local") else param
            total += local.detach().double().sum()
    if sharded:
        total = accelerator.reduce(total, reduction="sum")
    return float(total)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB: the peak resident memory of this process.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _log(message: str) -> None:
    print(f"[mods.train] {message}", file=sys.stderr, flush=True)


def run_training_process(job: TrainJob, encoded: list[EncodedRow], tokenizer: Any | None) -> dict[str, Any] | None:
    """The training loop of one process (all of them run it); returns the summary on
    rank 0 (None elsewhere). Rank 0 writes ``job.out_dir``; ``tokenizer`` is only
    needed there."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType
    from transformers import AutoModelForCausalLM

    from mods.models import pick_device

    config = job.config
    device = pick_device(config.device)
    if device.type == "cuda" and device.index is not None and job.processes == 1:
        torch.cuda.set_device(device)
    amp_dtype = autocast_dtype(config.precision, device)
    mixed_precision = "bf16" if amp_dtype is not None else "no"
    fsdp = uses_fsdp(config, job.processes)
    plan = training_plan([len(r.input_ids) for r in encoded], config, job.processes)
    fsdp_plugin = None
    if fsdp:
        fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",  # one unit per decoder layer (_no_split_modules)
            reshard_after_forward=True,  # full sharding: parameters gathered only while a layer runs
            state_dict_type="SHARDED_STATE_DICT",  # checkpoints: each process writes its own shard
            activation_checkpointing=config.gradient_checkpointing,
            # Every process reads the fp32 weights, then keeps only its shard: transformers
            # 5.24 still reads the whole file on every rank even with accelerate's
            # cpu_ram_efficient_loading (checked here), so it would only add a broadcast.
            cpu_ram_efficient_loading=False,
        )
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=plan.accumulation,  # A slots per process per optimiser step
        fsdp_plugin=fsdp_plugin,
        # The schedule counts optimiser steps of the whole run, not steps per process.
        step_scheduler_with_optimizer=False,
    )
    if fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate 1.15 turns FSDP on only for GPU-type backends; torch's FSDP2
        # (fully_shard) runs on gloo, so CPU runs (the tests) take the same path.
        from accelerate.state import PartialState

        # Both shared states: accelerate re-reads PartialState's into AcceleratorState.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = fsdp_plugin
        if mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    if world != job.processes:
        raise RuntimeError(f"expected {job.processes} training processes, accelerate sees {world}")
    main = accelerator.is_main_process

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = job.pad_id
    model.config.use_cache = False  # no KV cache while training (and required by checkpointing)
    if config.gradient_checkpointing and not fsdp:
        # Non-reentrant: works with DDP and frozen LoRA bases, and replays the RNG, so
        # dropout masks are the same as without checkpointing.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    recomputes = bool(fsdp_plugin.activation_checkpointing if fsdp else model.is_activation_checkpointing)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets: Any = config.lora_target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        torch.manual_seed(config.seed)  # the same adapter initialisation in every process
        model = get_peft_model(
            model,
            LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
    model.train()

    total_steps = plan.total_steps
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_scheduler, int(config.warmup_ratio * total_steps), total_steps)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    def keep_trainable(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        # LoRA checkpoints hold the adapter, not a copy of the frozen base model. The
        # names come from the models save_state hands over (not wrapped in DDP).
        for i, (saved_model, state) in enumerate(zip(models, weights)):
            trainable = {name for name, p in saved_model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in state.items() if k in trainable}

    accelerator.register_save_state_pre_hook(keep_trainable)

    # Per micro-batch, in global order: [loss, tokens]; gathered to every process.
    records: dict[int, tuple[float, int]] = {}
    start_step = 0
    resume = latest_checkpoint(job.checkpoint_dir, job.fingerprint)
    if resume is not None:
        folder, meta = resume
        accelerator.load_state(str(folder), strict=False)
        # load_state restores accelerate's micro-batch counter, which counts this run's
        # slots per process: a checkpoint of another process count would put the
        # gradient syncs off the step boundaries. A checkpoint is always on one.
        accelerator.step = 0
        loaded = _trainable_checksum(model, accelerator, fsdp)
        if not math.isclose(loaded, meta["checksum"], rel_tol=1e-6, abs_tol=1e-6):
            raise RuntimeError(f"checkpoint {folder} did not load: weight checksum {loaded} != {meta['checksum']}")
        start_step = meta["step"]
        records = {int(k): (v[0], v[1]) for k, v in meta["records"].items()}
        if main and job.progress:
            _log(f"resuming from {folder.name} (step {start_step} of {total_steps})")
    if job.checkpoint_dir is not None and main and job.checkpoint_dir.is_dir():
        # Not created here: the first save creates it, so a run that saves none leaves nothing.
        for stale in job.checkpoint_dir.glob(".tmp-*"):  # saves cut short by a kill
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()

    in_process = job.work_dir is None
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)  # this run's peak, not the process's
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               disable=not (job.progress and in_process and main))
    log_every = max(1, total_steps // 20)
    tokens_this_run = 0
    started = time.perf_counter()
    for step in range(start_step, total_steps):
        mine = plan.for_process(step, rank)
        step_records = torch.zeros((len(mine), 3), dtype=torch.float64, device=accelerator.device)
        for slot, index in enumerate(mine):
            rows = plan.micro_batches[index if index is not None else step * plan.per_step]
            batch = {k: v.to(accelerator.device) for k, v in collate([encoded[i] for i in rows], job.pad_id).items()}
            torch.manual_seed(micro_batch_seed(config.seed, index if index is not None else -1))
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                # accelerate divides by A and DDP/FSDP average over P: the weight A·P / n
                # makes the update the mean over the step's n real micro-batches (0: padding).
                accelerator.backward(loss * plan.loss_weight(step, index))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if index is not None:
                tokens = int(batch["attention_mask"].sum())
                tokens_this_run += tokens
                step_records[slot] = torch.tensor([index, float(loss.detach()), tokens], dtype=torch.float64)
            else:
                step_records[slot, 0] = -1
        for index, loss_value, tokens in accelerator.gather(step_records).tolist():
            if index >= 0:
                records[int(index)] = (loss_value, int(tokens))
        done = step + 1
        bar.update(1)
        last_loss = records[max(records)][0]
        bar.set_postfix(loss=f"{last_loss:.3f}")
        if job.progress and main and not in_process and (done % log_every == 0 or done == total_steps):
            _log(f"step {done}/{total_steps} loss {last_loss:.4f}")
        if job.checkpoint_dir is not None and config.checkpoint_every and done % config.checkpoint_every == 0 \
                and done < total_steps:
            _save_checkpoint(accelerator, model, job, done, records, fsdp)
    bar.close()
    seconds = time.perf_counter() - started
    tokens_this_run = int(accelerator.reduce(torch.tensor(tokens_this_run, device=accelerator.device), "sum"))
    peak = float(accelerator.reduce(torch.tensor(_peak_memory_mb(accelerator.device), device=accelerator.device,
                                                 dtype=torch.float64), "max"))

    # The artifact: every process takes part in gathering FSDP shards; rank 0 writes.
    model.eval()
    state_dict = accelerator.get_state_dict(model) if fsdp else None
    summary = None
    if main:
        out_dir = job.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True  # a saved full model generates with its KV cache
        if state_dict is not None:
            unwrapped.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        else:
            unwrapped.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        ordered = [records[i] for i in sorted(records)]
        losses = [loss for loss, _ in ordered]
        per_epoch = plan.per_epoch
        summary = {
            "rows": job.rows,
            "method": config.method,
            "batches": len(plan.micro_batches),
            "optimizer_steps": total_steps,
            "tokens": sum(tokens for _, tokens in ordered),
            "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens_this_run / seconds, 1) if seconds else None,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "mean_loss_first_epoch": sum(losses[:per_epoch]) / max(1, len(losses[:per_epoch])),
            "mean_loss_last_epoch": sum(losses[-per_epoch:]) / max(1, len(losses[-per_epoch:])),
            "autocast": str(amp_dtype) if amp_dtype else "fp32",
            "processes": job.processes,
            "global_batch": config.global_batch,
            "micro_batches_per_step": plan.per_step,
            "idle_slots_per_step": plan.idle_slots_per_step,
            "resumed_from_step": start_step,
            "peak_memory_mb": round(peak, 1),
            "fsdp": fsdp,
            "gradient_checkpointing": recomputes,
        }
        meta = {"base_model": job.base_model, "method": config.method, "summary": summary}
        (out_dir / TRAINED_MODEL_META).write_text(json.dumps(meta, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _save_checkpoint(accelerator: Any, model: Any, job: TrainJob, step: int,
                     records: dict[int, tuple[float, int]], sharded: bool) -> None:
    """``save_state`` into a temporary folder, then one rename: a kill during the save
    leaves only a ``.tmp-*`` folder, which is never resumed from."""
    assert job.checkpoint_dir is not None
    final = job.checkpoint_dir / checkpoint_name(step)
    temporary = job.checkpoint_dir / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    checksum = _trainable_checksum(model, accelerator, sharded)
    accelerator.wait_for_everyone()  # every shard and RNG state written
    if accelerator.is_main_process:
        meta = {"step": step, "fingerprint": job.fingerprint, "checksum": checksum,
                "records": {str(k): list(v) for k, v in records.items()}}
        (temporary / CHECKPOINT_META).write_text(json.dumps(meta))
        _fsync_tree(temporary)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        for old in job.checkpoint_dir.glob("step-*"):
            if old != final:  # the new one is complete: the older ones are not needed
                shutil.rmtree(old, ignore_errors=True)
        if job.progress:
            _log(f"checkpoint {final}")
    accelerator.wait_for_everyone()


# --- the entry point --------------------------------------------------------------------------


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
    """Fine-tune ``base_model`` on ``rows`` (instruction, input, output) and save to ``out_dir``.

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

    from mods.models import resolve_model_path

    if len(rows) == 0:
        raise ValueError("no rows to train on: the selection is empty")
    processes = resolve_processes(config)
    idle = idle_slots_warning(config, processes)
    if idle is not None:
        log.warning("train: %s", idle)
    model_path = resolve_model_path(base_model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = encode_rows(tokenizer, rows, config.max_length)
    from mods.models import pick_device

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
    from mods.launch import launch_training

    return launch_training(job, encoded, tokenizer)


def load_trained_model(model_dir: str | Path, device: str | None = None) -> tuple[Any, Any]:
    """A model saved by ``train_model``, ready for inference (LoRA merged into the weights,
    which makes generation as fast as the base model)."""
    from mods.models import load_causal_lm, resolve_model_path

    model_dir = Path(model_dir)
    meta_path = model_dir / TRAINED_MODEL_META
    if not meta_path.is_file():
        # Any plain HF causal-LM folder works as well.
        return load_causal_lm(model_dir, device=device)
    meta = json.loads(meta_path.read_text())
    if meta["method"] == "full":
        return load_causal_lm(model_dir, device=device)
    from peft import PeftModel

    model, tokenizer = load_causal_lm(resolve_model_path(meta["base_model"]), device=device)
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
