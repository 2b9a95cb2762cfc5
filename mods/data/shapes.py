"""Record shapes: recognising what kind of instruction data a record is (Alpaca,
ShareGPT conversations, self-instruct tasks, prompt/completion, question/answer, or a
user-given field mapping) and mapping it to candidate rows of the canonical schema
(``candidates``), or to the reason it is quarantined.

Every candidate carries its conversation (``messages``, see ``mods.data.conversations``): the
exchange(s) its ``turn`` mode keeps, or with ``turn='conversation'`` the whole
conversation, cleaned by ``_whole_conversation``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mods.data.conversations import Message, exchange_messages
from mods.data.text import MISSING, Quarantine, check_text, type_name

if TYPE_CHECKING:
    from mods.data.config import IngestConfig

ENDOFTEXT = "<|endoftext|>"
USER_ROLES = {"human", "user", "prompter", "question"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bing", "bard", "model", "bot", "answer"}
SYSTEM_ROLES = {"system"}


@dataclass
class _Candidate:
    instruction: str
    input: str
    output: str
    history: list  # [[user, assistant], ...]
    later: list  # [{"role", "content"}, ...] turns after the scored one
    meta: dict
    messages: list[Message]  # the conversation the row keeps (mods.data.conversations)


def _lookup(obj: dict) -> dict[str, str]:
    return {str(k).lower(): k for k in obj}


def _get(obj: dict, keys: dict[str, str], *names: str) -> tuple[Any, str | None]:
    for n in names:
        k = keys.get(n.lower())
        if k is not None:
            return obj[k], k
    return MISSING, None


def _detect(keys: dict[str, str], mapping: dict[str, str]) -> str:
    if any(src.lower() in keys for src in mapping.values()):
        return "mapped"
    if "conversations" in keys or "messages" in keys:
        return "conversations"
    if "instances" in keys and "instruction" in keys:
        return "self_instruct"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "question" in keys and ("std_answer" in keys or "answer" in keys):
        return "question_answer"
    if keys.keys() & {"instruction", "output", "response", "input"}:
        return "alpaca_response" if "response" in keys and "output" not in keys else "alpaca"
    return "unknown"


def _history_pairs(value: Any, cfg: IngestConfig) -> list[list[str]]:
    if value is MISSING or value is None:
        return []
    if isinstance(value, str):  # some exports store it JSON-encoded
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError:
            raise Quarantine("bad_history", "history is a string that is not a JSON list") from None
    if not isinstance(value, list):
        raise Quarantine("bad_history", f"history is a {type_name(value)}, not a list of [user, assistant] pairs")
    pairs = []
    for i, p in enumerate(value):
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise Quarantine("bad_history", f"history[{i}] is not a [user, assistant] pair")
        u = check_text(p[0], f"history[{i}][0]", cfg, True, "instruction")
        a = check_text(p[1], f"history[{i}][1]", cfg, True, "output")
        pairs.append([u, a])
    return pairs


def _apply_turn(instr: str, inp: str, out: str, history: list, cfg: IngestConfig, meta: dict) -> _Candidate:
    """A row with chat history: move the scored turn to the first exchange if asked
    ('first'; 'conversation' keeps the first exchange as instruction/output too)."""
    system = meta.get("system", "")
    if cfg.turn == "conversation":
        first = history[0] if history else [instr, out]
        return _Candidate(first[0], "" if history else inp, first[1], [], [], meta,
                          exchange_messages(instr, inp, out, history, system))
    if cfg.turn == "first" and history:
        later = []
        for u, a in history[1:]:
            later += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        last_user = f"{instr}\n\n{inp}" if inp else instr
        later += [{"role": "user", "content": last_user}, {"role": "assistant", "content": out}]
        meta["later_turns"] = later
        return _Candidate(history[0][0], "", history[0][1], [], later, meta,
                          exchange_messages(history[0][0], "", history[0][1], (), system))
    return _Candidate(instr, inp, out, history, [], meta, exchange_messages(instr, inp, out, history, system))


def _whole_conversation(turns: list[dict], cfg: IngestConfig, meta: dict) -> _Candidate:
    """turn='conversation': the whole conversation as one row. Empty turns are dropped,
    consecutive turns of one role merged (blank line between), then leading assistant turns
    (a continuation of an earlier part) and a trailing unanswered user turn are dropped;
    every dropped turn is listed in ``metadata.dropped``, merged ones in ``metadata.merged``.
    Quarantined only when no user->assistant exchange remains."""
    kept: list[dict] = []  # {"role", "content", "turns": [1-based turn numbers]}
    dropped: list[dict] = []
    for t in turns:
        base = "instruction" if t["role"] == "user" else "output"
        text = check_text(t["content"], f"turn {t['n']} ({t['role']})", cfg, False, base)
        if not text:
            dropped.append({"turn": t["n"], "role": t["role"], "reason": "empty"})
        elif kept and kept[-1]["role"] == t["role"]:
            kept[-1]["content"] += "\n\n" + text
            kept[-1]["turns"].append(t["n"])
        else:
            kept.append({"role": t["role"], "content": text, "turns": [t["n"]]})
    if kept and kept[0]["role"] == "assistant":
        dropped += [{"turn": n, "role": "assistant", "reason": "starts_with_assistant"} for n in kept.pop(0)["turns"]]
    if kept and kept[-1]["role"] == "user":
        dropped += [{"turn": n, "role": "user", "reason": "unanswered"} for n in kept.pop()["turns"]]
    if not kept:
        what = ", ".join(sorted({d["reason"] for d in dropped}))
        raise Quarantine("no_answered_turn", "no user turn is followed by an assistant turn"
                          + (f" (dropped turns: {what})" if what else ""))
    for i, k in enumerate(kept):  # the first exchange is the row's instruction/output: min_chars applies
        if i < 2 or len(k["turns"]) > 1:  # merged text may pass max_chars
            base = "instruction" if k["role"] == "user" else "output"
            check_text(k["content"], f"turn {k['turns'][0]} ({k['role']})", cfg, i < 2, base)
    if dropped:
        meta["dropped"] = sorted(dropped, key=lambda d: d["turn"])
    merged = [{"turns": k["turns"], "role": k["role"]} for k in kept if len(k["turns"]) > 1]
    if merged:
        meta["merged"] = merged
    system = meta.get("system", "")
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages += [{"role": k["role"], "content": k["content"]} for k in kept]
    return _Candidate(kept[0]["content"], "", kept[1]["content"], [], [], meta, messages)


def _conversation(value: Any, cfg: IngestConfig, meta: dict) -> _Candidate:
    if isinstance(value, str):
        raise Quarantine("bad_conversation", "conversations is a string, not a list of turns")
    if not isinstance(value, list):
        raise Quarantine("bad_conversation", f"conversations is a {type_name(value)}, not a list of turns")
    turns: list[dict] = []
    system = []
    for i, t in enumerate(value):
        if not isinstance(t, dict):
            raise Quarantine("bad_conversation", f"turn {i + 1} is a {type_name(t)}, not an object")
        tk = _lookup(t)
        role, _ = _get(t, tk, "from", "role", "speaker")
        text, _ = _get(t, tk, "value", "content", "text")
        if not isinstance(role, str):
            raise Quarantine("bad_conversation", f"turn {i + 1} has no 'from'/'role'")
        r = role.lower()
        if r in SYSTEM_ROLES:
            system.append(check_text(text, f"turn {i + 1} (system)", cfg, False, "instruction"))
            continue
        if r in USER_ROLES:
            r = "user"
        elif r in ASSISTANT_ROLES:
            r = "assistant"
        else:
            raise Quarantine("unknown_role", f"turn {i + 1} has role {role!r} (neither user nor assistant)")
        turns.append({"role": r, "content": text, "n": i + 1})
    if system:
        meta["system"] = "\n\n".join(s for s in system if s)
    if not turns:
        raise Quarantine("no_answered_turn", "the conversation has no user or assistant turns")
    if len(turns) == 1:
        raise Quarantine("single_turn", f"the conversation has one turn only (from the {turns[0]['role']})")

    def text_of(t: dict, required: bool, base: str) -> str:
        return check_text(t["content"], f"turn {t['n']} ({t['role']})", cfg, required, base)

    if cfg.turn == "conversation":
        return _whole_conversation(turns, cfg, meta)
    if cfg.turn == "first":
        if turns[0]["role"] != "user":
            raise Quarantine("starts_with_assistant", "the conversation starts with the assistant (turn='first')")
        if turns[1]["role"] != "assistant":
            raise Quarantine("no_answered_turn", "the first user turn is followed by another user turn, not an answer")
        scored, history, rest, strays = 0, [], turns[2:], []
    else:
        scored = max((i for i in range(len(turns) - 1)
                      if turns[i]["role"] == "user" and turns[i + 1]["role"] == "assistant"), default=-1)
        if scored < 0:
            raise Quarantine("no_answered_turn", "no user turn is followed by an assistant turn")
        history, strays, i = [], [], 0
        while i < scored:
            if turns[i]["role"] == "user" and turns[i + 1]["role"] == "assistant" and i + 1 < scored:
                history.append([text_of(turns[i], True, "instruction"), text_of(turns[i + 1], True, "output")])
                i += 2
            else:
                strays.append({"role": turns[i]["role"], "content": text_of(turns[i], False, "output")})
                i += 1
        rest = turns[scored + 2:]
    instr = text_of(turns[scored], True, "instruction")
    out = text_of(turns[scored + 1], True, "output")
    later = [{"role": t["role"], "content": text_of(t, False, "output")} for t in rest]
    if later:
        meta["later_turns"] = later
    if strays:
        meta["unpaired_turns"] = strays
    return _Candidate(instr, "", out, history, later, meta,
                      exchange_messages(instr, "", out, history, meta.get("system", "")))


def candidates(obj: Any, cfg: IngestConfig) -> list[_Candidate | Quarantine]:
    """One record -> its candidate rows (several for self-instruct tasks)."""
    if not isinstance(obj, dict):
        return [Quarantine("not_an_object", f"the record is a {type_name(obj)}, not an object")]
    keys = _lookup(obj)
    mapping = cfg.field_mapping
    shape = _detect(keys, mapping)
    if shape == "unknown":
        return [Quarantine("unknown_shape", f"no recognisable fields (has: {', '.join(list(obj)[:8])})")]
    used: set[str] = set()

    def get(canon: str, *aliases: str) -> Any:
        names = (mapping[canon],) if canon in mapping else aliases
        v, k = _get(obj, keys, *names)
        if k is not None:
            used.add(k)
        return v

    meta: dict[str, Any] = {"shape": shape}
    out: list[_Candidate | Quarantine] = []
    try:
        if shape == "conversations":
            conv = get("history", "conversations", "messages")
            cand = _conversation(conv, cfg, meta)
            out.append(cand)
        elif shape == "self_instruct":
            instr = get("instruction", "instruction")
            instances = get("input", "instances")
            if not isinstance(instances, list):
                raise Quarantine("wrong_type", f"instances is a {type_name(instances)}, not a list")
            if not instances:
                raise Quarantine("empty_instances", "the task has no instances")
            for k, inst in enumerate(instances):
                try:
                    i_meta = dict(meta, instance=k)
                    if not isinstance(inst, dict):
                        raise Quarantine("wrong_type", f"instances[{k}] is a {type_name(inst)}, not an object")
                    ik = _lookup(inst)
                    i_instr = check_text(instr, "instruction", cfg, True, "instruction")
                    i_inp = check_text(_get(inst, ik, "input")[0], f"instances[{k}].input", cfg, False, "input")
                    i_out = check_text(_get(inst, ik, "output")[0], f"instances[{k}].output", cfg, True, "output")
                    out.append(_Candidate(i_instr, i_inp, i_out, [], [], i_meta, exchange_messages(i_instr, i_inp, i_out)))
                except Quarantine as q:
                    q.detail = f"instance {k}: {q.detail}"
                    out.append(q)
        else:
            if shape == "prompt_completion":
                instr_v, inp_v, out_v = get("instruction", "prompt"), MISSING, get("output", "completion")
                if isinstance(out_v, str):
                    out_v = out_v.rstrip()
                    if out_v.endswith(ENDOFTEXT):
                        out_v = out_v[: -len(ENDOFTEXT)]
            elif shape == "question_answer":
                instr_v, inp_v, out_v = get("instruction", "question"), MISSING, get("output", "std_answer", "answer")
            else:  # alpaca, alpaca_response, mapped
                instr_v = get("instruction", "instruction")
                inp_v = get("input", "input")
                out_v = get("output", "output", "response")
                system_v, system_k = _get(obj, keys, "system")  # LLaMA-Factory's Alpaca system prompt
                if isinstance(system_v, str) and system_k is not None:
                    used.add(system_k)
                    system = check_text(system_v, "system", cfg, False, "instruction")
                    if system:
                        meta["system"] = system
            hist_v = get("history", "history")
            instr = check_text(instr_v, "instruction", cfg, True, "instruction")
            inp = check_text(inp_v, "input", cfg, False, "input")
            outp = check_text(out_v, "output", cfg, True, "output")
            history = _history_pairs(hist_v, cfg)
            out.append(_apply_turn(instr, inp, outp, history, cfg, meta))
    except Quarantine as q:
        out.append(q)
    extra = {k: v for k, v in obj.items() if k not in used}
    if extra:
        for c in out:
            if isinstance(c, _Candidate):
                c.meta["extra"] = extra
    return out
