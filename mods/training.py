"""Fine-tuning the base LLM on selected rows (seed training and final training).

LoRA (peft) by default, so a 2-core CPU can run the method end to end; ``method="full"``
is the paper's full fine-tuning for GPU runs. A plain training loop rather than the HF
Trainer: one small job, length-grouped batches (little padding), prompt tokens masked
out of the loss, bf16 autocast where the hardware has it.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import pandas as pd
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from mods.prompts import answer_suffix, chat_prompt

TRAINED_MODEL_META = "mods_model.json"


class TrainConfig(BaseModel):
    method: Literal["lora", "full"] = Field(
        "lora", description="'lora' (peft adapter) or 'full' fine-tuning (the paper; GPU)."
    )
    epochs: float = Field(2.0, gt=0, description="Passes over the training rows (paper: 3).")
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate (paper, full fine-tuning: 2e-5; LoRA: ~1e-4–3e-4)."
    )
    batch_size: int = Field(8, ge=1, description="Rows per optimiser step (before accumulation).")
    gradient_accumulation: int = Field(1, ge=1, description="Batches per optimiser step.")
    max_length: int = Field(384, ge=16, description="Tokens per row (prompt + answer); longer rows are cut.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps with linear warm-up (paper: 0.03).")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up (paper: cosine).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Module names that get LoRA adapters ('all-linear' for every linear layer).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto': bf16 autocast where the CPU/GPU supports it, else fp32."
    )
    seed: int = Field(0, description="Seed for batch order, dropout and adapter initialisation.")
    device: str | None = Field(None, description="'cpu', 'cuda', or empty for automatic.")


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


def train_model(
    base_model: str,
    rows: pd.DataFrame,
    config: TrainConfig,
    out_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``base_model`` on ``rows`` (instruction, input, output) and save to ``out_dir``.

    Saves a peft adapter (LoRA) or a full model, plus ``mods_model.json`` naming the base
    model, so ``load_trained_model`` can rebuild it on any machine that has that base.
    Returns a summary (steps, tokens, tokens/s, losses).
    """
    from mods.models import load_causal_lm, pick_device, resolve_model_path

    if len(rows) == 0:
        raise ValueError("no rows to train on: the selection is empty")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device = pick_device(config.device)
    model, tokenizer = load_causal_lm(resolve_model_path(base_model), device=str(device))
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets: Any = config.lora_target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
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
    encoded = encode_rows(tokenizer, rows, config.max_length)
    batches = length_grouped_batches([len(r.input_ids) for r in encoded], config.batch_size, config.seed)
    epochs_full = math.ceil(config.epochs)
    per_epoch = len(batches)
    total_batches = max(1, round(per_epoch * config.epochs))
    total_steps = max(1, math.ceil(total_batches / config.gradient_accumulation))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_scheduler, int(config.warmup_ratio * total_steps), total_steps)
    )
    amp_dtype = autocast_dtype(config.precision, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    done = 0
    bar = tqdm(total=total_batches, desc="train", unit="batch", disable=not progress)
    for epoch in range(epochs_full):
        order = batches if epoch == 0 else length_grouped_batches(
            [len(r.input_ids) for r in encoded], config.batch_size, config.seed + epoch
        )
        for batch_ids in order:
            if done >= total_batches:
                break
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in batch_ids], pad_id).items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = model(**batch).loss / config.gradient_accumulation
            loss.backward()
            done += 1
            tokens += int(batch["attention_mask"].sum())
            if done % config.gradient_accumulation == 0 or done == total_batches:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()) * config.gradient_accumulation)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    seconds = time.perf_counter() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    summary = {
        "rows": len(rows),
        "method": config.method,
        "batches": done,
        "optimizer_steps": total_steps,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "mean_loss_first_epoch": sum(losses[:per_epoch]) / max(1, len(losses[:per_epoch])),
        "mean_loss_last_epoch": sum(losses[-per_epoch:]) / max(1, len(losses[-per_epoch:])),
        "autocast": str(amp_dtype) if amp_dtype else "fp32",
    }
    meta = {"base_model": base_model, "method": config.method, "summary": summary}
    (out_dir / TRAINED_MODEL_META).write_text(json.dumps(meta, indent=2))
    return summary


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
