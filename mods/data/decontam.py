"""Decontamination: drop training rows whose prompt overlaps an evaluation prompt.

Texts are lower-cased and split into word tokens (each CJK character is a token, so
Chinese is handled too). An evaluation item and a training prompt overlap by

    overlap = |shared n-grams| / min(|n-grams of the row|, |n-grams of the eval item|)

(the overlap coefficient), so an eval prompt copied inside a longer training prompt
counts as fully contained, and so does a training prompt copied from a longer eval
record. A text shorter than n tokens contributes its whole token sequence as one
gram, so short prompts still match when copied exactly. Lookups are hash-set
probes, one per n-gram of a training row: no pairwise comparisons.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mods.data.readers import RawRecord, SourceError, discover, read_source

_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+")
# Keys of eval records that are labels, not prompt text.
_SKIP_KEYS = {"id", "idx", "question_id", "answer_id", "model_id", "category", "skill",
              "difficulty", "motivation_app", "class", "name", "is_classification", "index", "tstamp"}
_MIN_TOKENS = 4  # eval strings shorter than this (labels, "yes", "A") would match by chance


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def ngrams(toks: list[str], n: int) -> set[int]:
    if len(toks) < n:
        return {hash(tuple(toks))} if toks else set()
    return {hash(tuple(toks[i: i + n])) for i in range(len(toks) - n + 1)}


def _strings(obj: Any, key: str = "") -> Iterator[str]:
    if isinstance(obj, str):
        if key.lower() not in _SKIP_KEYS:
            yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v, key)


@dataclass
class EvalIndex:
    n: int
    threshold: float
    gram_to_items: dict[int, list[int]] = field(default_factory=dict)
    item_sizes: list[int] = field(default_factory=list)
    item_names: list[str] = field(default_factory=list)
    item_texts: list[str] = field(default_factory=list)

    def add(self, name: str, texts: Iterable[str]) -> None:
        grams: set[int] = set()
        kept = []
        for t in texts:
            toks = tokens(t)
            if len(toks) >= _MIN_TOKENS:
                grams |= ngrams(toks, self.n)
                kept.append(t)
        if not grams:
            return
        item = len(self.item_sizes)
        self.item_sizes.append(len(grams))
        self.item_names.append(name)
        self.item_texts.append(kept[0][:80].replace("\n", " "))
        for g in grams:
            self.gram_to_items.setdefault(g, []).append(item)

    def __len__(self) -> int:
        return len(self.item_sizes)

    def match(self, text: str) -> tuple[float, int] | None:
        """The best (overlap, eval item) at or over the threshold, else None."""
        grams = ngrams(tokens(text), self.n)
        if not grams:
            return None
        hits: Counter[int] = Counter()
        table = self.gram_to_items
        for g in grams:
            items = table.get(g)
            if items:
                hits.update(items)
        if not hits:
            return None
        best, best_item = 0.0, -1
        size = len(grams)
        for item, k in hits.items():
            ov = k / min(size, self.item_sizes[item])
            if ov > best:
                best, best_item = ov, item
        return (best, best_item) if best >= self.threshold else None

    def describe(self, item: int) -> str:
        return f"{self.item_names[item]} ({self.item_texts[item]!r})"


def build_index(paths: list[str | Path], n: int, threshold: float) -> EvalIndex:
    """Read every eval file (any JSON / JSON lines / CSV / Parquet shape: all string
    fields but labels count as eval text). Raises SourceError on unreadable paths."""
    index = EvalIndex(n=n, threshold=threshold)
    for src in discover(list(paths)):
        for rec in read_source(src):
            rec: RawRecord
            if rec.error is not None:
                raise SourceError(f"{src.name}: line {rec.line}: evaluation set is not valid ({rec.error[1]})")
            obj = rec.obj
            if isinstance(obj, str) and obj.lstrip().startswith(("[", "{")):
                try:
                    obj = json.loads(obj)
                except ValueError:
                    pass
            index.add(f"{src.name}:{rec.line}", _strings(obj))
    return index
