"""Evaluation prompts: the MoDS paper's five test sets, or any file of prompts a user brings.

Files are read with the project's own readers (``mods.data.readers``: JSON, JSON lines, CSV,
Parquet, ...); this module only knows where a test record keeps its prompt, its input and,
when it has one, a reference answer. Unlike training rows, a test prompt needs no answer,
so ``mods.data.ingest`` (which quarantines rows without an output) is not the right door.

The paper's five sets, as they ship (see ../shared/data/README.md):

=============  ==========================================  ===========================
name           file                                        reference answers
=============  ==========================================  ===========================
koala          koala_test_set.jsonl (prompt)               none
wizardlm       wizardlm_testset.jsonl (Instruction)        none
selfinstruct   selfinstruct_user_oriented_instructions     instances[0].output
vicuna         vicuna80_question.jsonl (turns[0])          vicuna80_reference_gpt4 (10)
lima           lima_test_set.jsonl (conversations: str)    none
=============  ==========================================  ===========================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from mods.data.readers import SourceError, discover, read_source

# name -> (prompt file, reference-answer file or None), as named in the shared test-set folder.
PAPER_TEST_SETS: dict[str, tuple[str, str | None]] = {
    "koala": ("koala_test_set.jsonl", None),
    "wizardlm": ("wizardlm_testset.jsonl", None),
    "selfinstruct": ("selfinstruct_user_oriented_instructions.jsonl", None),
    "vicuna": ("vicuna80_question.jsonl", "vicuna80_reference_gpt4.jsonl"),
    "lima": ("lima_test_set.jsonl", None),
}

PROMPT_COLUMNS = ["test_set", "prompt_id", "instruction", "input", "reference"]

# Field names tried, in order, for each part of a test record (case-insensitive).
_PROMPT_KEYS = ("instruction", "prompt", "question", "query", "text", "turns", "conversations", "messages")
_INPUT_KEYS = ("input", "context")
_REFERENCE_KEYS = ("reference", "output", "answer", "response", "std_answer", "completion")
_ID_KEYS = ("id", "idx", "question_id", "prompt_id")
_USER_ROLES = {"human", "user", "prompter"}


class PromptFileError(ValueError):
    """A test-set file that cannot be used; the message is one line naming it."""


@dataclass
class PromptsRead:
    rows: pd.DataFrame  # PROMPT_COLUMNS
    skipped: dict[str, int]  # reason -> count of records that gave no prompt


def _get(obj: dict, *names: str) -> Any:
    lower = {str(k).lower(): k for k in obj}
    for name in names:
        if name in lower:
            return obj[lower[name]]
    return None


def _first_user_text(value: Any) -> str | None:
    """A prompt held as a string, a list of turns (strings or {role, content}), or a
    conversation: the first user turn."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, str):
            return first
        for turn in value:
            if isinstance(turn, dict):
                role = str(_get(turn, "from", "role", "speaker") or "user").lower()
                text = _get(turn, "value", "content", "text")
                if role in _USER_ROLES and isinstance(text, str):
                    return text
    return None


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def prompt_of(obj: Any) -> tuple[str, str, str | None] | str:
    """(instruction, input, reference or None) of one test record, or the reason it has none."""
    if not isinstance(obj, dict):
        return "not_an_object"
    instances = _get(obj, "instances")
    instruction = _first_user_text(_get(obj, *_PROMPT_KEYS))
    if instruction is None or not instruction.strip():
        return "no_prompt"
    input_text = _text(_get(obj, *_INPUT_KEYS))
    reference = _get(obj, *_REFERENCE_KEYS)
    if isinstance(instances, list) and instances and isinstance(instances[0], dict):
        # Self-instruct: the task's first instance gives the input and the reference.
        input_text = input_text or _text(_get(instances[0], "input"))
        reference = reference if reference is not None else _get(instances[0], "output")
    reference = _text(reference) or None
    return instruction.strip(), input_text, reference


def _records(path: Path) -> list[tuple[int, Any]]:
    try:
        sources = discover([str(path)])
        out: list[tuple[int, Any]] = []
        for source in sources:
            for record in read_source(source):
                out.append((record.line, None if record.error else record.obj))
        return out
    except SourceError as error:
        raise PromptFileError(str(error)) from None


def read_references(path: str | Path) -> dict[str, str]:
    """Reference answers keyed by question id: FastChat's ``reference_answer/*.jsonl``
    (question_id, choices[0].turns[0]) or plain {id, reference/output/answer} records."""
    references: dict[str, str] = {}
    for _, obj in _records(Path(path)):
        if not isinstance(obj, dict):
            continue
        key = _get(obj, *_ID_KEYS)
        choices = _get(obj, "choices")
        text = None
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            text = _first_user_text(_get(choices[0], "turns"))
        if text is None:
            text = _get(obj, *_REFERENCE_KEYS)
        if key is not None and isinstance(text, str) and text.strip():
            references[str(key)] = text.strip()
    if not references:
        raise PromptFileError(f"{path}: no reference answers found (expected question_id + choices[0].turns, "
                           "or id + reference)")
    return references


def read_test_set(path: str | Path, name: str | None = None, references: str | Path | None = None) -> PromptsRead:
    """One test set as rows (test_set, prompt_id, instruction, input, reference).

    Records without a usable prompt are counted in ``skipped`` by reason, never raised;
    a file with no prompt at all is a ``PromptFileError``.
    """
    path = Path(path)
    name = name or path.stem
    refs = read_references(references) if references else {}
    rows: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    for line, obj in _records(path):
        got = "unparseable" if obj is None else prompt_of(obj)
        if isinstance(got, str):
            skipped[got] = skipped.get(got, 0) + 1
            continue
        instruction, input_text, reference = got
        raw_id = _get(obj, *_ID_KEYS)
        prompt_id = str(raw_id) if raw_id is not None else str(line)
        if prompt_id in seen:  # ids must be unique within a set: fall back to the line
            prompt_id = f"{prompt_id}@{line}"
        seen.add(prompt_id)
        reference = refs.get(str(raw_id), reference) if raw_id is not None else reference
        rows.append({"test_set": name, "prompt_id": prompt_id, "instruction": instruction,
                     "input": input_text, "reference": reference})
    if not rows:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "empty file"
        raise PromptFileError(f"{path}: no test prompts found ({detail}); expected a prompt/instruction/question/"
                           "turns/conversations field per record")
    return PromptsRead(pd.DataFrame(rows, columns=PROMPT_COLUMNS), skipped)


def find_test_sets(directory: str | Path, names: Sequence[str], files: Sequence[str] = ()) -> list[tuple[str, Path, Path | None]]:
    """(name, prompt file, reference file) for the paper's sets named in ``names`` (found in
    ``directory``) and for the user's own ``files`` (named by their stem)."""
    directory = Path(directory)
    chosen: list[tuple[str, Path, Path | None]] = []
    for name in names:
        if name not in PAPER_TEST_SETS:
            raise PromptFileError(f"unknown test set {name!r}; the paper's sets are {', '.join(PAPER_TEST_SETS)} "
                               "(give other files as test_files)")
        prompt_file, reference_file = PAPER_TEST_SETS[name]
        path = directory / prompt_file
        if not path.is_file():
            raise PromptFileError(f"test set {name!r} not found: {path} does not exist (set evaluation.test_sets_dir "
                               "to the folder holding the paper's test sets)")
        reference = directory / reference_file if reference_file else None
        chosen.append((name, path, reference if reference and reference.is_file() else None))
    taken = {name for name, _, _ in chosen}
    for file in files:
        path = Path(file)
        if not path.exists():
            raise PromptFileError(f"test file {file} does not exist")
        name = path.stem
        while name in taken:
            name += "_"
        taken.add(name)
        chosen.append((name, path, None))
    if not chosen:
        raise PromptFileError("no test sets chosen: name some in evaluation.test_sets or give evaluation.test_files")
    return chosen


def sample_prompts(frame: pd.DataFrame, per_set: int | None, reference_per_set: int | None, seed: int) -> pd.DataFrame:
    """Seeded draw per test set: ``per_set`` prompts every model answers (column
    ``answer``) and ``reference_per_set`` prompts with a reference answer whose
    likelihood is measured (column ``reference_loglik``); None = all. A row can be in both."""
    parts = []
    for index, (name, rows) in enumerate(frame.groupby("test_set", sort=False)):
        rows = rows.reset_index(drop=True)
        # One generator per set, seeded by the set's position: adding a set leaves the
        # others' draws unchanged only if order is kept, so the order is the config's.
        rng = np.random.default_rng([seed, index])
        answer = np.zeros(len(rows), dtype=bool)
        answer[rng.permutation(len(rows))[: per_set if per_set is not None else len(rows)]] = True
        has_reference = rows["reference"].notna().to_numpy()
        reference = np.zeros(len(rows), dtype=bool)
        candidates = np.flatnonzero(has_reference)
        take = len(candidates) if reference_per_set is None else min(reference_per_set, len(candidates))
        reference[rng.permutation(candidates)[:take]] = True
        keep = answer | reference
        parts.append(rows.assign(answer=answer, reference_loglik=reference)[keep])
    out = pd.concat(parts, ignore_index=True) if parts else frame.assign(answer=[], reference_loglik=[])
    return out.reset_index(drop=True)
