"""The architect: a rule-based decomposition of a query into subtasks.

Every query gets the same three-step graph, each step naming the capability (a manifest tag)
it needs:

1. ``retrieve`` (``embedding``): embed the query together with the corpus passages that share
   the most words with it, and keep the passage nearest the query (cosine similarity).
2. ``classify`` (``classifier``): classify the query's topic (for the *Opticks* models, which
   Book it belongs to). Independent of ``retrieve``: both run in parallel.
3. ``generate`` (``text-generation``): continue the retrieved passage and the query with the
   language model. Depends on ``retrieve`` (its prompt includes the passage), so runs after it.

A step with no model anywhere on the network is skipped, and the answer says so.
"""

from __future__ import annotations

import functools
import heapq
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

MAX_PASSAGES = 15  # with the query: 16 texts, one embedder request
PASSAGE_CHARS = 240
_WORD = re.compile(r"[a-z]{3,}")
STOPWORDS = frozenset("the and that which with from this are for was were they their there into have been".split())


@dataclass(frozen=True)
class Subtask:
    name: str
    capability: str
    depends_on: tuple[str, ...]
    purpose: str


PLAN = (
    Subtask("retrieve", "embedding", (), "find the corpus passage nearest the query"),
    Subtask("classify", "classifier", (), "classify the query's topic"),
    Subtask("generate", "text-generation", ("retrieve",), "continue the passage and the query"),
)


def plan(query: str) -> list[Subtask]:
    return list(PLAN)


def waves(subtasks: list[Subtask]) -> list[list[Subtask]]:
    """Subtasks in dependency order: each wave depends only on earlier waves."""
    return [list(w) for w in _waves(tuple(subtasks))]


@functools.lru_cache(maxsize=64)
def _waves(subtasks: tuple[Subtask, ...]) -> tuple[tuple[Subtask, ...], ...]:
    """``waves``, computed once per graph (every query has the same one)."""
    done: set[str] = set()
    left = list(subtasks)
    out = []
    while left:
        ready = [s for s in left if set(s.depends_on) <= done]
        if not ready:
            raise ValueError(f"subtasks {[s.name for s in left]} depend on each other or on unknown ones")
        out.append(tuple(ready))
        done |= {s.name for s in ready}
        left = [s for s in left if s not in ready]
    return tuple(out)


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def load_passages(path: Path | None) -> list[str]:
    """The corpus cut into passages of about PASSAGE_CHARS characters (at sentence ends)."""
    if path is None or not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        while len(para) > 40:
            cut = para.rfind(". ", 0, PASSAGE_CHARS)
            cut = cut + 1 if cut > PASSAGE_CHARS // 3 else min(len(para), PASSAGE_CHARS)
            out.append(para[:cut].strip())
            para = para[cut:].strip()
    return out


def index_passages(passages: list[str]) -> list[frozenset[str]]:
    """Each passage's (non-stop) words, computed once for every later query."""
    return [frozenset(_words(p)) for p in passages]


def candidate_passages(query: str, passages: list[str], limit: int = MAX_PASSAGES, *,
                       words: list[frozenset[str]] | None = None) -> list[str]:
    """The passages sharing the most (non-stop) words with the query: the embedder ranks these.
    ``words`` is ``index_passages(passages)`` when the caller keeps it."""
    q = _words(query)
    index = words if words is not None and len(words) == len(passages) else index_passages(passages)
    scored = sorted(((len(q & w), -i) for i, w in enumerate(index)), reverse=True)
    return [passages[-i] for score, i in scored[:limit] if score > 0] or passages[:limit]


class PassageIndex:
    """The passages and an inverted index of their words: ``candidates`` gives exactly what
    ``candidate_passages`` gives, from the postings of the query's words alone rather than a
    pass over every passage, and remembers the answers of recent word sets (queries that
    differ only in numbers or stop words share one)."""

    MEMO = 1024

    def __init__(self, passages: list[str]) -> None:
        self.passages = passages
        self._postings: dict[str, list[int]] = {}
        for i, words in enumerate(index_passages(passages)):
            for w in words:
                self._postings.setdefault(w, []).append(i)
        self._memo: OrderedDict[tuple[frozenset[str], int], list[str]] = OrderedDict()

    def candidates(self, query: str, limit: int = MAX_PASSAGES) -> list[str]:
        key = (frozenset(_words(query)), limit)
        found = self._memo.get(key)
        if found is None:
            scores: Counter[int] = Counter()
            for w in key[0]:
                scores.update(self._postings.get(w, ()))
            best = heapq.nsmallest(limit, scores.items(), key=lambda kv: (-kv[1], kv[0]))
            found = [self.passages[i] for i, _ in best] or self.passages[:limit]
            self._memo[key] = found
            if len(self._memo) > self.MEMO:
                self._memo.popitem(last=False)
        else:
            self._memo.move_to_end(key)
        return list(found)
