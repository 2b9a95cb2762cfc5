"""Training and necessity-generation throughput: ours against a plain baseline, same run.

    .venv/bin/python benchmarks/train_generate.py [--rows 24] [--prompts 24] [--new-tokens 48]

Baselines, measured here in the same process on the same rows:
- training: fp32, rows in input order (padding to the longest of each random batch);
  ours: bf16 autocast where the CPU has it, length-grouped batches.
- generation: the LoRA adapter left unmerged, one prompt at a time (the paper's
  batch size 1); ours: adapter merged into the weights, length-sorted batches.
- processes: the same LoRA training in 2 processes (DDP over gloo, 1 thread each, one
  micro-batch each per step) against 1 process (all threads, and 1 thread; two
  micro-batches per step): the same global_batch, so the same updates. Tokens/s of the
  training loop, and the wall time of the whole ``train_model`` call (which for 2
  processes includes starting them).
- train-memory: peak resident memory of the demo's final training (32 real ShareGPT rows
  of the demo's sample, at most 1,000 characters each as ``sample.max_chars`` measures
  them; the pipeline's ``final_training`` settings: LoRA, 2 epochs, global batch 8, bf16
  autocast) with the loss before ``mods.training.loss`` (``model(**batch).loss``: logits
  for every position, no recomputation, glibc's default heap) against ours, each in a
  fresh child process (``ru_maxrss`` never goes down), with the losses of each, their
  largest difference from the first variant, and the loop's wall and the child's CPU
  time. ``--memory-variants`` adds the steps in between; ``--memory-max-chars 0`` takes
  rows of any length (more cut at ``max_length``: the widest micro-batches);
  ``--memory-precision fp32`` trains without bf16 autocast (its rounding apart).
Prints tokens/s for each and the ratio. Rows: real ShareGPT rows (the demo pool).
``--parts`` picks what to run (default: train, generate, processes).
Both sides get an untimed warm-up first (the first batches on this CPU are slow), then
they alternate ``--repeats`` times and the best time of each counts, so neither side
pays for warm-up or for a burst of load on the shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mods.data.ingest import IngestConfig, ingest  # noqa: E402
from mods.data.readers import demo_sources  # noqa: E402
from mods.generation.answers import generate_answers  # noqa: E402
from mods.generation.config import GenerationConfig  # noqa: E402
from mods.models.loading import load_causal_lm, resolve_model_path  # noqa: E402
from mods.training import plan as training_plan  # noqa: E402
from mods.training import process as training_process  # noqa: E402
from mods.training.config import TrainConfig  # noqa: E402
from mods.training.train import load_trained_model, train_model  # noqa: E402


def demo_rows(n: int, max_chars: int | None = 800) -> pd.DataFrame:
    rows = ingest(demo_sources(), IngestConfig(), progress=False).rows
    if max_chars:  # the sample stage's measure: what a row trains on (every turn of a conversation)
        try:
            from mods.data.conversations import conversation_chars
        except ImportError:  # exchange rows only
            def conversation_chars(row) -> int:
                return sum(len(str(row[c])) for c in ("instruction", "input", "output"))
        size = pd.Series([conversation_chars(row) for row in rows.to_dict("records")], index=rows.index)
        rows = rows[size <= max_chars]
    return rows.sample(n=n, random_state=0).reset_index(drop=True)


def time_training(rows: pd.DataFrame, out: Path, precision: str, grouped: bool) -> tuple[float, int]:
    original = training_plan.length_grouped_batches
    if not grouped:  # baseline: batches in input order
        training_plan.length_grouped_batches = lambda lengths, size, seed: [
            list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)
        ]
    try:
        config = TrainConfig(epochs=1, batch_size=8, max_length=256, precision=precision, device="cpu")
        summary = train_model("smollm2-135m-instruct", rows, config, out, progress=False)
    finally:
        training_plan.length_grouped_batches = original
    return summary["seconds"], summary["tokens"]


def time_processes(rows: pd.DataFrame, out: Path, processes: int, threads: int | None = None) -> tuple[float, float, int]:
    """(training-loop seconds, whole-call seconds, tokens) for one run at global batch 8."""
    config = TrainConfig(epochs=1, batch_size=4, global_batch=8, processes=processes, max_length=256, device="cpu")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        summary = train_model("smollm2-135m-instruct", rows, config, out, progress=False)
        return summary["seconds"], time.perf_counter() - started, summary["tokens"]
    finally:
        torch.set_num_threads(before)


def compare_processes(rows: pd.DataFrame, tmp: Path, repeats: int) -> None:
    time_processes(rows.head(8), tmp / "warm-p", 1)  # warm-up, untimed
    runs: dict[str, list[tuple[float, float, int]]] = {"one": [], "one-thread": [], "two": []}
    for _ in range(repeats):
        runs["one"].append(time_processes(rows, tmp / "p1", 1))
        runs["one-thread"].append(time_processes(rows, tmp / "p1t", 1, threads=1))
        runs["two"].append(time_processes(rows, tmp / "p2", 2))
    labels = {"one": f"1 process, {torch.get_num_threads()} threads", "one-thread": "1 process, 1 thread",
              "two": "2 processes, 1 thread each"}
    rates = {}
    for name, results in runs.items():
        loop, _, tokens = min(results)
        call = min(r[1] for r in results)
        rates[name] = (tokens / loop, call)
        print(f"processes  {labels[name]:28s}: {tokens / loop:7.1f} tok/s ({tokens} tokens, loop {loop:.1f} s, "
              f"whole call {call:.1f} s)")
    print(f"processes  2 processes against 1 process (all threads): {rates['two'][0] / rates['one'][0]:.2f}x tokens/s "
          f"in the loop, {rates['one'][1] / rates['two'][1]:.2f}x on the whole call")
    print(f"processes  2 processes against 1 process (1 thread)   : {rates['two'][0] / rates['one-thread'][0]:.2f}x "
          f"tokens/s in the loop")


def fsdp_memory_estimate(gpus: int = 8, micro_batch: int = 16, seq: int = 512) -> None:
    """Per-GPU memory of full fine-tuning Llama-2-7B with FSDP full sharding, bf16 mixed
    precision, AdamW: an estimate from the parameter count (the architecture is built on
    the meta device, nothing is downloaded) and the shapes; not a measurement."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    h, i, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    tokens = micro_batch * seq
    gb = 1e9
    # fp32 master weights, fp32 gradients, AdamW's two fp32 moments: 16 bytes per parameter, sharded
    states = 16 * params / gpus
    # bf16 copies of the layer being computed and the one prefetched, plus the
    # unsharded embedding and output layer (the tail unit stays gathered)
    gathered = 2 * layer * 2 + 2 * (2 * v * h)
    grads_in_flight = 2 * layer * 2  # bf16 gradients of two layers before their reduce-scatter
    # tensors a decoder layer keeps for its backward, per token: bf16 q, k, v (+ roped q, k),
    # attention output, o_proj input, two norm outputs (2 bytes each); fp32 norm inputs
    # (4 bytes, RMSNorm upcasts); gate, up, act(gate), act(gate)*up in bf16
    per_token_layer = 2 * (3 * h + 2 * h + h + h + 2 * h) + 4 * (2 * h) + 2 * (4 * i)
    activations = per_token_layer * layers * tokens
    checkpointed = 2 * h * layers * tokens + per_token_layer * tokens  # layer inputs + one layer recomputed
    logits = tokens * v * (2 + 4 + 4)  # bf16 logits, fp32 upcast for the loss, fp32 gradient
    print(f"Llama-2-7B: {params:,} parameters ({layer:,} per decoder layer); {gpus} GPUs, "
          f"micro-batch {micro_batch} x {seq} tokens per GPU")
    rows = [
        ("weights + gradients + AdamW (fp32, sharded 1/%d)" % gpus, states, states),
        ("gathered bf16 layers (2) + embedding + output layer", gathered, gathered),
        ("unsharded bf16 gradients in flight (2 layers)", grads_in_flight, grads_in_flight),
        ("activations kept for backward", activations, checkpointed),
        ("logits and loss (bf16 + fp32)", logits, logits),
    ]
    print(f"{'':56s} {'no checkpointing':>17s} {'checkpointing':>14s}")
    for name, plain, recompute in rows:
        print(f"{name:56s} {plain / gb:14.1f} GB {recompute / gb:11.1f} GB")
    print(f"{'total (before CUDA context, allocator slack ~2-4 GB)':56s} {sum(r[1] for r in rows) / gb:14.1f} GB "
          f"{sum(r[2] for r in rows) / gb:11.1f} GB")
    print(f"without sharding, one GPU would hold {16 * params / gb:.0f} GB of weights, gradients and AdamW states")


# The changes a train-memory variant has, '+'-joined ("loss+heap"); "before" has none,
# "ours" all three (what final_training runs now).
MEMORY_CHANGES = {
    "loss": "mods.training.loss (logits only where a label follows, chunked cross-entropy)",
    "recompute": "activation recomputation (train.gradient_checkpointing)",
    "heap": "tensors of >= 1 MiB freed back to the system (return_freed_tensors_to_the_system)",
}


def memory_changes(variant: str) -> set[str]:
    if variant == "before":
        return set()
    if variant == "ours":
        return set(MEMORY_CHANGES)
    changes = set(variant.split("+"))
    if not changes <= set(MEMORY_CHANGES):
        raise SystemExit(f"unknown train-memory variant {variant!r}: before, ours or a '+'-join of {', '.join(MEMORY_CHANGES)}")
    return changes


def train_memory_child(variant: str, rows_path: str, precision: str) -> None:
    """One final-training run in this fresh process; prints its summary as JSON (last line)."""
    import resource

    from mods.config import PipelineConfig

    changes = memory_changes(variant)
    if "loss" not in changes:  # the loss before mods.training.loss: logits at every position
        training_process.causal_lm_loss = lambda model, batch: model(**batch).loss
    if "heap" not in changes:
        training_process.return_freed_tensors_to_the_system = lambda: False
    rows = pd.read_parquet(rows_path)
    config = PipelineConfig().final_training.model_copy(
        update={"device": "cpu", "gradient_checkpointing": "recompute" in changes, "precision": precision})
    with tempfile.TemporaryDirectory() as tmp:
        summary = train_model("smollm2-135m-instruct", rows, config, Path(tmp) / "model", progress=False)
    # CPU seconds of the whole child (user + system: page faults included); on shared cores
    # a steadier measure of the cost than the loop's wall time.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    # The whole child's peak (MiB), model loading included: the summary's own figure starts
    # at the training loop (mods.training.process._reset_peak_memory).
    summary["peak_memory_mb"] = usage.ru_maxrss / 1024
    print(json.dumps(summary))


def compare_train_memory(rows: pd.DataFrame, tmp: Path, variants: list[str], precision: str = "auto") -> None:
    path = tmp / "memory-rows.parquet"
    rows.to_parquet(path)
    results = {}
    for variant in variants:
        memory_changes(variant)  # a misspelt variant fails before the first run
    for variant in variants:
        done = subprocess.run([sys.executable, __file__, "--memory-child", variant, str(path), precision],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"train-memory {variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    for variant in variants:
        print(f"train-memory {variant}: " + (", ".join(MEMORY_CHANGES[c] for c in sorted(memory_changes(variant)))
                                           or "model(**batch).loss, no recomputation, glibc's default heap"))
    first = results[variants[0]]
    print(f"train-memory {len(rows)} rows, {first['tokens']} tokens, {first['optimizer_steps']} optimizer steps, "
          f"{first['batches']} micro-batches, autocast {first['autocast']}")
    keys = ("first_loss", "last_loss", "mean_loss_first_epoch", "mean_loss_last_epoch")

    def gap(summary: dict) -> float:  # the largest loss difference from the first variant
        return max(abs(summary[k] - first[k]) for k in keys)

    print(f"train-memory {'':16s} {'peak RSS':>10s} {'loop':>7s} {'CPU':>7s} {'first loss':>12s} "
          f"{'last loss':>12s} {'epoch-1 mean':>13s} {'epoch-2 mean':>13s} {'max |diff|':>10s}")
    for variant, summary in results.items():
        print(f"train-memory {variant:16s} {summary['peak_memory_mb']:6.0f} MiB "
              f"{summary['seconds']:6.1f}s {summary['cpu_seconds']:6.1f}s {summary['first_loss']:12.7f} "
              f"{summary['last_loss']:12.7f} {summary['mean_loss_first_epoch']:13.7f} "
              f"{summary['mean_loss_last_epoch']:13.7f} {gap(summary):10.1e}")
    if len(results) > 1:
        last = results[variants[-1]]
        print(f"train-memory {variants[-1]} against {variants[0]}: "
              f"peak {last['peak_memory_mb'] / first['peak_memory_mb']:.2f}x, loop time "
              f"{last['seconds'] / first['seconds']:.2f}x, CPU time {last['cpu_seconds'] / first['cpu_seconds']:.2f}x, "
              f"largest loss difference {gap(last):.1e}")


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
    parser.add_argument("--parts", default="train,generate,processes",
                        help="comma-separated: train, generate, processes, train-memory, memory (the 7B FSDP estimate)")
    parser.add_argument("--memory-variants", default="before,ours",
                        help="train-memory: comma-separated runs, each 'before', 'ours' or a '+'-join of "
                             f"{', '.join(MEMORY_CHANGES)} (e.g. loss+heap)")
    parser.add_argument("--memory-rows", type=int, default=32, help="train-memory: rows (the demo selects 32)")
    parser.add_argument("--memory-max-chars", type=int, default=1000,
                        help="train-memory: longest row in characters (the demo's sample.max_chars; 0: any)")
    parser.add_argument("--memory-precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="train-memory: train.precision of every run (auto, the pipeline's: bf16 autocast "
                             "where the CPU has it; fp32 shows the losses without bf16's rounding)")
    parser.add_argument("--memory-child", nargs=3, metavar=("VARIANT", "ROWS", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        train_memory_child(*args.memory_child)
        return
    parts = set(args.parts.split(","))
    if "memory" in parts:
        fsdp_memory_estimate()
        parts.discard("memory")
    if "train-memory" in parts:
        resolve_model_path("smollm2-135m-instruct")
        with tempfile.TemporaryDirectory() as tmp:
            compare_train_memory(demo_rows(args.memory_rows, args.memory_max_chars or None), Path(tmp),
                                 args.memory_variants.split(","), args.memory_precision)
        parts.discard("train-memory")
    if not parts:
        return
    torch.manual_seed(0)
    resolve_model_path("smollm2-135m-instruct")  # prepare outside the timings
    rows = demo_rows(args.rows + args.prompts)
    train_rows, prompt_rows = rows.head(args.rows), rows.tail(args.prompts)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 CPU: {training_process.cpu_supports_bf16()}")

    with tempfile.TemporaryDirectory() as tmp:
        if "processes" in parts:
            compare_processes(train_rows, Path(tmp), args.repeats)
        if not parts & {"train", "generate"}:
            return
        time_training(train_rows.head(4), Path(tmp) / "warm", "auto", grouped=True)  # warm-up, untimed
        base, ours = [], []
        for _ in range(args.repeats):
            base.append(time_training(train_rows, Path(tmp) / "base", "fp32", grouped=False))
            ours.append(time_training(train_rows, Path(tmp) / "ours", "auto", grouped=True))
        base_s, base_tok = min(base)
        ours_s, ours_tok = min(ours)
        if "train" in parts:
            print(f"training   baseline fp32, input order : {base_tok / base_s:7.1f} tok/s ({base_tok} tokens, best {base_s:.1f} s)")
            print(f"training   ours bf16-auto, grouped    : {ours_tok / ours_s:7.1f} tok/s ({ours_tok} tokens, best {ours_s:.1f} s)")
            print(f"training   speed-up (tokens/s)        : {(ours_tok / ours_s) / (base_tok / base_s):.2f}x")
        if "generate" not in parts:
            return

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
