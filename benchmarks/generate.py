"""Generation throughput: vLLM against transformers' ``generate``, same prompts, same run.

    .venv/bin/python benchmarks/generate.py [--prompts 256] [--new-tokens 64] [--adapter]

Both engines answer the same prompts (real ShareGPT rows of the demo pool) with the same
settings: the packaged SmolLM2-135M-Instruct, fp32, greedy, ``--new-tokens`` new tokens,
through ``mods.generation.answers.open_answer_engine`` (what the answers stage runs).
transformers: ``--hf-batch`` prompts per ``generate`` call (16, the default
``generation.batch_size``); vLLM: every prompt in one call (it batches by itself).
Each engine answers the prompts once untimed first (a warm-up), then timed; the engine start is timed
apart and not counted in tokens/s. Tokens: the answers' tokens (the same tokenizer for
both). ``--adapter`` also times how to serve a LoRA seed model on vLLM: merged into a
temporary full model (what mods does) against vLLM's LoRARequest on the base model.
Needs vLLM (``make vllm``). The last line: ``vllm_tokens_per_s=… transformers_tokens_per_s=… ratio=…``.
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

from mods.data.ingest import IngestConfig, ingest  # noqa: E402
from mods.data.readers import demo_sources  # noqa: E402
from mods.generation.answers import open_answer_engine  # noqa: E402
from mods.generation.config import GenerationConfig  # noqa: E402
from mods.models.loading import DEFAULT_BASE_MODEL, resolve_model_path  # noqa: E402


def demo_prompts(n: int, max_chars: int = 400) -> pd.DataFrame:
    rows = ingest(demo_sources(), IngestConfig(), progress=False).rows
    size = rows["instruction"].str.len() + rows["input"].str.len()
    return rows[size <= max_chars].sample(n=n, random_state=0).reset_index(drop=True)


def timed_answers(engine, rows: pd.DataFrame, tokenizer) -> tuple[list[str], float, int]:
    # Warm-up, untimed: one pass over the same prompts (vLLM compiles for new batch shapes
    # on its first passes: 264 against 300 tokens/s on the second), so both are timed steady.
    engine.answer(rows["instruction"].tolist(), rows["input"].tolist())
    started = time.perf_counter()
    answers = engine.answer(rows["instruction"].tolist(), rows["input"].tolist())
    seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return answers, seconds, tokens


def random_adapter(out: Path) -> Path:
    """A LoRA seed model as ``mods train`` saves one (q/v, r=8), with random non-zero weights."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model

    from mods.models.loading import load_causal_lm
    from mods.training.process import TRAINED_MODEL_META

    torch.manual_seed(0)
    model, _ = load_causal_lm(DEFAULT_BASE_MODEL, device="cpu")
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(out)
    (out / TRAINED_MODEL_META).write_text(json.dumps({"method": "lora", "base_model": DEFAULT_BASE_MODEL}))
    return out


def adapter_served(adapter: Path, rows: pd.DataFrame, config: GenerationConfig) -> tuple[float, float, int]:
    """vLLM with the adapter as a LoRARequest on the base model: (start s, answer s, tokens)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from mods.generation.tokens import eos_token_ids, prompt_token_ids
    from mods.generation.vllm_engine import _cpu_threads_env
    from mods.models.loading import load_causal_lm

    for name, value in _cpu_threads_env().items():
        os.environ.setdefault(name, value)
    base = resolve_model_path(DEFAULT_BASE_MODEL)
    _, tokenizer = load_causal_lm(base, device="cpu")
    started = time.perf_counter()
    llm = LLM(model=str(base), dtype="float32", seed=0, enable_lora=True, max_lora_rank=8, max_loras=1,
              max_model_len=config.max_prompt_length + config.max_new_tokens, generation_config="vllm",
              enable_prefix_caching=False)
    start_seconds = time.perf_counter() - started
    try:
        sampling = SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens,
                                  stop_token_ids=eos_token_ids(tokenizer), detokenize=False)
        lora = LoRARequest("seed", 1, str(adapter))
        ids = prompt_token_ids(tokenizer, rows["instruction"].tolist(), rows["input"].tolist(),
                               config.max_prompt_length)
        llm.generate([{"prompt_token_ids": p} for p in ids], sampling, lora_request=lora, use_tqdm=False)  # warm-up
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in ids], sampling, lora_request=lora, use_tqdm=False)
        seconds = time.perf_counter() - started
    finally:
        llm.llm_engine.engine_core.shutdown()
    answers = [tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=True).strip() for o in outputs]
    return start_seconds, seconds, sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--adapter", action="store_true", help="also time a LoRA adapter: merged against LoRARequest")
    args = parser.parse_args()
    rows = demo_prompts(args.prompts)
    model = resolve_model_path(DEFAULT_BASE_MODEL)
    vllm_config = GenerationConfig(engine="vllm", max_new_tokens=args.new_tokens, batch_size=args.prompts, device="cpu")
    hf_config = GenerationConfig(engine="transformers", max_new_tokens=args.new_tokens, batch_size=args.hf_batch,
                                 device="cpu")

    started = time.perf_counter()
    hf = open_answer_engine(model, hf_config)
    hf_start = time.perf_counter() - started
    hf_answers, hf_seconds, hf_tokens = timed_answers(hf, rows, hf.tokenizer)
    hf.close()

    started = time.perf_counter()
    vllm = open_answer_engine(model, vllm_config)
    vllm_start = time.perf_counter() - started
    try:
        vllm_answers, vllm_seconds, vllm_tokens = timed_answers(vllm, rows, hf.tokenizer)
    finally:
        vllm.close()

    same = sum(a == b for a, b in zip(vllm_answers, hf_answers))
    print(f"{len(rows)} prompts, {args.new_tokens} new tokens, greedy, fp32, {os.cpu_count()} cores")
    print(f"transformers (batch {args.hf_batch}): start {hf_start:.1f} s, {hf_tokens} tokens in {hf_seconds:.1f} s")
    print(f"vLLM (one call): engine start {vllm_start:.1f} s (not counted), {vllm_tokens} tokens in {vllm_seconds:.1f} s")
    print(f"identical answers: {same}/{len(rows)}")
    if args.adapter:
        with tempfile.TemporaryDirectory() as tmp:
            adapter = random_adapter(Path(tmp) / "adapter")
            started = time.perf_counter()
            merged = open_answer_engine(adapter, vllm_config)
            merged_start = time.perf_counter() - started
            try:
                _, merged_seconds, merged_tokens = timed_answers(merged, rows, hf.tokenizer)
            finally:
                merged.close()
            served_start, served_seconds, served_tokens = adapter_served(adapter, rows, vllm_config)
        print(f"LoRA merged (mods): start {merged_start:.1f} s, {merged_tokens / merged_seconds:.1f} tokens/s")
        print(f"LoRA as LoRARequest: start {served_start:.1f} s, {served_tokens / served_seconds:.1f} tokens/s")
    vllm_rate, hf_rate = vllm_tokens / vllm_seconds, hf_tokens / hf_seconds
    print(f"vllm_tokens_per_s={vllm_rate:.1f} transformers_tokens_per_s={hf_rate:.1f} ratio={vllm_rate / hf_rate:.2f}")


if __name__ == "__main__":
    main()
