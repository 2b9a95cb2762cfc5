"""Training and necessity-generation throughput: ours against a plain baseline, same run.

    .venv/bin/python benchmarks/train_generate.py [--rows 24] [--prompts 24] [--new-tokens 48]

Baselines, measured here in the same process on the same rows:
- training: fp32, rows in input order (padding to the longest of each random batch);
  ours: bf16 autocast where the CPU has it, length-grouped batches.
- generation: the LoRA adapter left unmerged, one prompt at a time (the paper's
  batch size 1); ours: adapter merged into the weights, length-sorted batches.
Prints tokens/s for each and the ratio. Rows: real ShareGPT rows (the demo pool).
Both sides get an untimed warm-up first (the first batches on this CPU are slow), then
they alternate ``--repeats`` times and the best time of each counts, so neither side
pays for warm-up or for a burst of load on the shared cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mods import training  # noqa: E402
from mods.generation import GenerationConfig, generate_answers  # noqa: E402
from mods.ingest import IngestConfig, ingest  # noqa: E402
from mods.models import load_causal_lm, resolve_model_path  # noqa: E402
from mods.stages import demo_sources  # noqa: E402
from mods.training import TrainConfig, load_trained_model, train_model  # noqa: E402


def demo_rows(n: int, max_chars: int = 800) -> pd.DataFrame:
    rows = ingest(demo_sources(), IngestConfig(), progress=False).rows
    size = rows["instruction"].str.len() + rows["input"].str.len() + rows["output"].str.len()
    return rows[size <= max_chars].sample(n=n, random_state=0).reset_index(drop=True)


def time_training(rows: pd.DataFrame, out: Path, precision: str, grouped: bool) -> tuple[float, int]:
    original = training.length_grouped_batches
    if not grouped:  # baseline: batches in input order
        training.length_grouped_batches = lambda lengths, size, seed: [
            list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)
        ]
    try:
        config = TrainConfig(epochs=1, batch_size=8, max_length=256, precision=precision, device="cpu")
        summary = train_model("smollm2-135m-instruct", rows, config, out, progress=False)
    finally:
        training.length_grouped_batches = original
    return summary["seconds"], summary["tokens"]


def time_generation(model, tokenizer, rows: pd.DataFrame, batch_size: int, new_tokens: int) -> tuple[float, int]:
    config = GenerationConfig(max_new_tokens=new_tokens, batch_size=batch_size, device="cpu")
    started = time.perf_counter()
    answers = generate_answers(model, tokenizer, rows["instruction"].tolist(), rows["input"].tolist(), config, progress=False)
    seconds = time.perf_counter() - started
    generated = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return seconds, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24, help="training rows")
    parser.add_argument("--prompts", type=int, default=24, help="prompts to answer")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    resolve_model_path("smollm2-135m-instruct")  # prepare outside the timings
    rows = demo_rows(args.rows + args.prompts)
    train_rows, prompt_rows = rows.head(args.rows), rows.tail(args.prompts)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 CPU: {training.cpu_supports_bf16()}")

    with tempfile.TemporaryDirectory() as tmp:
        time_training(train_rows.head(4), Path(tmp) / "warm", "auto", grouped=True)  # warm-up, untimed
        base, ours = [], []
        for _ in range(args.repeats):
            base.append(time_training(train_rows, Path(tmp) / "base", "fp32", grouped=False))
            ours.append(time_training(train_rows, Path(tmp) / "ours", "auto", grouped=True))
        base_s, base_tok = min(base)
        ours_s, ours_tok = min(ours)
        print(f"training   baseline fp32, input order : {base_tok / base_s:7.1f} tok/s ({base_tok} tokens, best {base_s:.1f} s)")
        print(f"training   ours bf16-auto, grouped    : {ours_tok / ours_s:7.1f} tok/s ({ours_tok} tokens, best {ours_s:.1f} s)")
        print(f"training   speed-up (tokens/s)        : {(ours_tok / ours_s) / (base_tok / base_s):.2f}x")

        from peft import PeftModel

        base_model, tokenizer = load_causal_lm(resolve_model_path("smollm2-135m-instruct"), device="cpu")
        unmerged = PeftModel.from_pretrained(base_model, str(Path(tmp) / "ours")).eval()
        merged, _ = load_trained_model(Path(tmp) / "ours", device="cpu")
        time_generation(merged, tokenizer, prompt_rows.head(2), batch_size=2, new_tokens=8)  # warm-up
        gen_base, gen_ours = [], []
        for _ in range(args.repeats):
            gen_base.append(time_generation(unmerged, tokenizer, prompt_rows, batch_size=1, new_tokens=args.new_tokens))
            gen_ours.append(time_generation(merged, tokenizer, prompt_rows, batch_size=16, new_tokens=args.new_tokens))
        b_s, b_tok = min(gen_base)
        o_s, o_tok = min(gen_ours)
        print(f"generation baseline unmerged, batch 1 : {b_tok / b_s:7.1f} new tok/s ({b_tok} tokens, best {b_s:.1f} s)")
        print(f"generation ours merged, batch 16      : {o_tok / o_s:7.1f} new tok/s ({o_tok} tokens, best {o_s:.1f} s)")
        print(f"generation speed-up (wall time)       : {b_s / o_s:.2f}x")


if __name__ == "__main__":
    main()
