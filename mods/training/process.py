"""One training process: the loop on ``accelerate`` that every process of a run executes
(one in this process, or several started by ``mods.training.launch``), its precision and
learning-rate schedule, its checkpoint saves and the trained model it writes."""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from mods.models.loading import pick_device
from mods.training.checkpoints import CHECKPOINT_META, checkpoint_name, latest_checkpoint, uses_fsdp
from mods.training.data import EncodedRow, collate
from mods.training.loss import causal_lm_loss
from mods.training.plan import micro_batch_seed, training_plan

if TYPE_CHECKING:
    from mods.training.config import TrainJob

TRAINED_MODEL_META = "mods_model.json"


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


# glibc's mallopt parameter M_MMAP_THRESHOLD (malloc.h), and the size set for it.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_tensors_to_the_system() -> bool:
    """On glibc, serve every allocation of at least 1 MiB from a mapping of its own, which
    ``free`` hands back to the system; returns whether it was set.

    By default glibc raises that threshold each time a large block is freed (up to 32
    MiB), so a training step's activations soon come from its heap, which shrinks only
    from the top: the freed ones stay resident around those still alive, and the demo's
    final training (with ``mods.training.loss`` and recomputation) peaked at 3,944 MiB
    where the same run with this set peaked at 2,305 MiB (docs/training.md, *Memory*).
    Process-wide, for the rest of the process (an in-process run leaves it set); the cost
    is a page fault for each page of a fresh mapping (measured on a run of the same
    settings: 18x the page faults, 27 s more system time on ~370 s of CPU time).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6 / mallopt)
        return False


def _reset_peak_memory(device: torch.device) -> float:
    """Start this run's peak at what the process holds now, so that the summary's
    ``peak_memory_mb`` is the training's, not that of the stages an in-process pipeline
    ran before it; returns what it holds now (MiB: CUDA allocated, or resident)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current resident size
    except OSError:  # not Linux: the process's peak, as ru_maxrss gives it
        pass
    return _peak_memory_mb(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # the peak resident memory since _reset_peak_memory (KiB)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    # Linux reports ru_maxrss in KiB: the peak resident memory of this process's life.
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

    config = job.config
    device = pick_device(config.device)
    if device.type == "cpu":  # on a GPU the activations are not in this heap
        return_freed_tensors_to_the_system()
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
    memory_at_start = _reset_peak_memory(accelerator.device)  # this run's peak, not the process's
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
                # = model(**batch).loss, without vocabulary-wide logits for tokens that
                # carry no loss (mods.training.loss): most of the memory of a step.
                loss = causal_lm_loss(model, batch)
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
    peak, memory_at_start = (float(v) for v in accelerator.reduce(torch.tensor(
        [_peak_memory_mb(accelerator.device), memory_at_start], device=accelerator.device, dtype=torch.float64), "max"))
    # Linux updates VmHWM from counters it syncs lazily: read at the end it can fall a few KiB
    # short of the resident size read at the start (seen: 1,429.8 against 1,429.9 MiB).
    peak = max(peak, memory_at_start)

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
            "memory_at_start_mb": round(memory_at_start, 1),
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
