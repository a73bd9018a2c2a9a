"""The ``search`` tool: BM25 over a generated corpus finds the gold passage of templated
questions, validates its untrusted arguments and touches no network."""

from __future__ import annotations

import socket

import pytest

from mmpo.errors import ConfigError
from mmpo.rollout.search_tool import NOT_FOUND, BM25Index, Passage, SearchTool, tokenize
from mmpo.rollout.tools import ToolCallError, parse_tool_calls
from mmpo_tasks.tool_qa.data import build_world

PASSAGES = [
    Passage("p0", "Velora", "Velora is a city in Marn."),
    Passage("p1", "Velora", "The population of Velora is 412,300."),
    Passage("p2", "Marn", "Marn is a country. The capital of Marn is Velora."),
    Passage("p3", "Osk", "The population of Osk is 9,100."),
]


def test_tokenizer_drops_stop_words_and_punctuation() -> None:
    assert tokenize("What is the Population of Velora?") == ["population", "velora"]
    assert tokenize("412,300 km²") == ["412", "300", "km"]
    assert tokenize("the of a") == []


def test_ranking_on_a_hand_corpus() -> None:
    index = BM25Index(PASSAGES)
    hits = index.search("population of Velora", 4)
    assert hits[0][0].id == "p1"  # both words match only there
    assert [p.id for p, _ in hits][:1] == ["p1"] and all(s > 0 for _, s in hits)
    assert {p.id for p, _ in hits} == {"p0", "p1", "p2", "p3"}  # every passage shares a word
    assert [p.id for p, _ in index.search("capital Marn", 1)] == ["p2"]
    assert index.search("zebra", 3) == []  # no shared word: nothing, not random passages


def test_gold_passage_for_templated_questions_of_the_generated_world() -> None:
    world = build_world(0)
    index = BM25Index(world.passages)
    for c in world.cities:
        top = index.search(f"What is the population of {c.name}?", 1)[0][0]
        assert top.text == f"The population of {c.name} is {c.population:,}.", c.name
        top = index.search(f"In which year was {c.name} founded?", 1)[0][0]
        assert top.text == f"{c.name} was founded in {c.founded}.", c.name
    for country, capital in world.countries.items():
        top = index.search(f"capital of {country}", 1)[0][0]
        assert top.text.endswith(f"The capital of {country} is {capital}.")
    for p in world.people:
        top = index.search(f"{p.name} born in the city of", 1)[0][0]
        assert top.text == f"{p.name} was born in the city of {p.born_in}."


def test_tool_output_format_and_limits() -> None:
    tool = SearchTool(PASSAGES, max_top_k=3, default_top_k=2, max_output_chars=64)
    out = tool.run({"query": "population Velora"}, {})
    assert not out.error and out.text == "Doc 1 (id: p1, Title: Velora) The population of V\n...[truncated]"
    assert len(out.text) == 64
    wide = SearchTool(PASSAGES, max_top_k=3, default_top_k=2)
    first = wide.run({"query": "population Velora"}, {}).text.splitlines()[0]
    assert first == "Doc 1 (id: p1, Title: Velora) The population of Velora is 412,300."
    assert wide.run({"query": "population Velora"}, {}).text.count("\nDoc ") == 1  # default_top_k = 2
    assert wide.run({"query": "population Velora", "top_k": 3}, {}).text.count("\nDoc ") == 2
    assert wide.run({"query": "zebra"}, {}).text == NOT_FOUND
    bad = wide.run({"query": "the of ?"}, {})
    assert bad.error and "no searchable word" in bad.text


def test_untrusted_arguments_are_refused() -> None:
    tools = {"search": SearchTool(PASSAGES, max_top_k=3, max_query_chars=20)}
    ok = parse_tool_calls(
        '<tool_call>{"name": "search", "arguments": {"query": "Velora", "top_k": 3}}</tool_call>', tools
    )
    assert ok[0].arguments == {"query": "Velora", "top_k": 3}
    for args in (
        '{"query": "Velora", "top_k": 0}',
        '{"query": "Velora", "top_k": 4}',
        '{"query": "Velora", "top_k": "3"}',
        '{"query": "Velora", "top_k": 2.5}',
        '{"query": ""}',
        '{"query": "' + "x" * 21 + '"}',
        '{"query": "Velora", "path": "/etc/passwd"}',
        '{"top_k": 1}',
    ):
        with pytest.raises(ToolCallError, match="invalid arguments for search"):
            parse_tool_calls(f'<tool_call>{{"name": "search", "arguments": {args}}}</tool_call>', tools)


def test_index_and_search_touch_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    tool = SearchTool(build_world(3).passages)
    assert tool.run({"query": "population"}, {}).text.startswith("Doc 1")


def test_bad_settings_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="default_top_k"):
        SearchTool(PASSAGES, max_top_k=2, default_top_k=3)
    with pytest.raises(ConfigError, match="no passage"):
        BM25Index([])
    with pytest.raises(ConfigError, match="unique"):
        BM25Index([PASSAGES[0], PASSAGES[0]])
