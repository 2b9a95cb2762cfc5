"""The plan of a training run: which micro-batch each process runs at each optimiser step.

Batch semantics (docs/training.md says the same): ``global_batch`` rows
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

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from mods.models.loading import pick_device

if TYPE_CHECKING:
    from mods.training.config import TrainConfig


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar length (little padding), in a seeded random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def resolve_processes(config: TrainConfig) -> int:
    """The number of training processes ``config`` asks for on this machine.

    Empty: every visible GPU when training on CUDA, else 1. Asking for more processes
    than visible GPUs on CUDA is an error (one process per GPU).
    """
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
