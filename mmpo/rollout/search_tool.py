"""The ``search`` tool: BM25 over a local corpus of passages (the offline stand-in for the web /
Wikipedia retrieval of TAPO, arXiv 2510.07038, and RL-Factory, arXiv 2509.06980; see
``docs/plugins/tool_qa.md``).

The index is built once, in memory, from the passages the task hands over (``bm25s``, Lucene
BM25 with k1 = 1.5, b = 0.75); nothing is downloaded and no file is read at run time. Text is
lower-cased and split into runs of letters and digits, and a short built-in list of English stop
words is dropped, the same way for passages (title + text) and queries. Ranking is by score,
ties broken by passage order, so results are deterministic.

The model's arguments are untrusted: ``query`` is a string of 1 to ``max_query_chars``
characters, ``top_k`` an integer in ``[1, max_top_k]`` (default ``default_top_k``); the schema
refuses anything else. Results read ``Doc i (id: <id>, Title: <title>) <text>``, one a line
(each passage keeps a short stable id), cut to ``max_output_chars``; a query that matches
nothing gives TAPO's "Sorry, I cannot find any relevant information."
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from mmpo.errors import ConfigError
from mmpo.rollout.tools import TOOLS, Tool, ToolResult

NOT_FOUND = "Sorry, I cannot find any relevant information."
_WORD = re.compile(r"[a-z0-9]+")
STOP_WORDS = frozenset(
    "a an and are as at be by for from has have how in is it its many much of on or that the this to was "
    "were what when where which who whom whose why with".split()
)


@dataclass(frozen=True)
class Passage:
    """One searchable passage: a short stable ``id``, a ``title`` and its ``text``."""

    id: str
    title: str
    text: str


def tokenize(text: str) -> list[str]:
    """Lower-cased runs of ``[a-z0-9]``, stop words dropped."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


class BM25Index:
    """BM25 (``bm25s``) over ``passages``; :meth:`search` gives ``(passage, score)`` pairs."""

    def __init__(self, passages: Sequence[Passage], *, k1: float = 1.5, b: float = 0.75) -> None:
        import bm25s

        if not passages:
            raise ConfigError("search index: the corpus has no passage")
        ids = [p.id for p in passages]
        if len(set(ids)) != len(ids):
            raise ConfigError("search index: passage ids must be unique")
        self.passages = list(passages)
        docs = [tokenize(f"{p.title} {p.text}") or ["<empty>"] for p in self.passages]
        self._bm25 = bm25s.BM25(k1=k1, b=b)
        self._bm25.index(docs, show_progress=False)
        self._vocab = set(self._bm25.vocab_dict)

    def search(self, query: str, top_k: int) -> list[tuple[Passage, float]]:
        """The ``top_k`` best passages with a positive score, best first (ties: corpus order)."""
        words = [w for w in tokenize(query) if w in self._vocab]
        if not words:
            return []
        scores = np.asarray(self._bm25.get_scores(words), dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [(self.passages[i], float(scores[i])) for i in order if scores[i] > 0]


class SearchTool(Tool):
    """``search(query, top_k)`` over a :class:`BM25Index` (built from ``passages`` when a list
    is given). Limits: ``max_top_k`` results (default 5), ``max_query_chars`` (300),
    ``max_output_chars`` (2048)."""

    name = "search"
    description = "Search the encyclopedia. Returns the top_k most relevant passages as 'Doc i (id, Title) text'."

    def __init__(
        self,
        corpus: BM25Index | Sequence[Passage],
        *,
        max_top_k: int = 5,
        default_top_k: int = 3,
        max_query_chars: int = 300,
        max_output_chars: int = 2048,
    ) -> None:
        if not 1 <= default_top_k <= max_top_k:
            raise ConfigError(f"search_tool.default_top_k must be in [1, max_top_k={max_top_k}]; got {default_top_k!r}")
        if max_query_chars < 1:
            raise ConfigError(f"search_tool.max_query_chars must be >= 1; got {max_query_chars!r}")
        if max_output_chars < 64:
            raise ConfigError(f"search_tool.max_output_chars must be >= 64; got {max_output_chars!r}")
        self.index = corpus if isinstance(corpus, BM25Index) else BM25Index(corpus)
        self.default_top_k, self.max_output_chars = default_top_k, max_output_chars
        self.parameters = {
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 1, "maxLength": max_query_chars},
                "top_k": {"type": "integer", "minimum": 1, "maximum": max_top_k},
            },
            "required": ["query"],
            "additionalProperties": False,
        }

    def run(self, arguments: dict[str, Any], context: dict[str, Any]) -> ToolResult:
        query = arguments["query"]
        if not tokenize(query):
            return ToolResult("error: the query has no searchable word", error=True)
        hits = self.index.search(query, int(arguments.get("top_k", self.default_top_k)))
        if not hits:
            return ToolResult(NOT_FOUND)
        text = "\n".join(f"Doc {i} (id: {p.id}, Title: {p.title}) {p.text}" for i, (p, _) in enumerate(hits, 1))
        if len(text) > self.max_output_chars:
            text = text[: self.max_output_chars - 15] + "\n...[truncated]"
        return ToolResult(text)


TOOLS.register("search")(SearchTool)

__all__ = ["NOT_FOUND", "STOP_WORDS", "BM25Index", "Passage", "SearchTool", "tokenize"]
