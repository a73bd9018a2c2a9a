"""The generated world of ``tool_qa``: an encyclopaedia of fictional countries, cities and people
(one passage per fact), and questions answerable only with tools.

Names are made of random syllables, so no pretrained model knows the facts: they must be
searched. Question kinds (ground truth computed here):

* ``lookup``: one fact (search once), e.g. the population of a city;
* ``two_hop``: a fact of an entity named by another fact (search twice), e.g. the population of
  a country's capital, or the country a person was born in;
* ``lookup_compute``: a fact then arithmetic (search + python), e.g. a city's population
  density to one decimal;
* ``product``: the product of two 4-digit numbers (python);
* ``list_sum``: the sum of twelve 3- to 4-digit numbers (python).

Everything is a pure function of the seed: the same world and questions on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from mmpo.rollout.search_tool import Passage

KINDS = ("lookup", "two_hop", "lookup_compute", "product", "list_sum")
_ONSETS = "b c d f g h k l m n p r s t v z br dr gr kr pl st tr th sh".split()
_VOWELS = "a e i o u ai ea io ou".split()
_CODAS = ["", "", "n", "r", "l", "s", "th", "m"]
PROFESSIONS = ["painter", "engineer", "astronomer", "poet", "cartographer", "physician", "composer", "botanist"]


@dataclass
class City:
    name: str
    country: str
    population: int
    area_km2: float
    founded: int


@dataclass
class Person:
    name: str
    born_in: str
    birth_year: int
    profession: str


@dataclass
class World:
    """The fictional encyclopaedia: ``countries`` (name -> capital), ``cities``, ``people`` and
    the ``passages`` that state their facts, one fact each."""

    countries: dict[str, str] = field(default_factory=dict)
    cities: list[City] = field(default_factory=list)
    people: list[Person] = field(default_factory=list)
    passages: list[Passage] = field(default_factory=list)


def _name(rng: random.Random, used: set[str], syllables: tuple[int, int]) -> str:
    while True:
        n = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n))
        word = word.capitalize()
        if word not in used and len(word) >= 4:
            used.add(word)
            return word


def build_world(seed: int, num_countries: int = 8, cities_per_country: int = 6, num_people: int = 48) -> World:
    """The world of ``seed``: ``num_countries`` countries of ``cities_per_country`` cities
    (the first is the capital) and ``num_people`` people born in them."""
    rng = random.Random(f"tool_qa-world-{seed}")
    used: set[str] = set()
    w = World()
    for _ in range(num_countries):
        country = _name(rng, used, (2, 3))
        names = [_name(rng, used, (2, 3)) for _ in range(cities_per_country)]
        w.countries[country] = names[0]
        for name in names:
            w.cities.append(
                City(
                    name,
                    country,
                    population=rng.randint(20, 4000) * 100 + rng.randint(0, 99),
                    area_km2=round(rng.uniform(12.0, 900.0), 1),
                    founded=rng.randint(800, 1900),
                )
            )
    for _ in range(num_people):
        first, last = _name(rng, used, (1, 2)), _name(rng, used, (2, 2))
        w.people.append(
            Person(
                f"{first} {last}",
                rng.choice(w.cities).name,
                rng.randint(1700, 1990),
                rng.choice(PROFESSIONS),
            )
        )
    facts: list[tuple[str, str]] = []
    for country, capital in w.countries.items():
        facts.append((country, f"{country} is a country. The capital of {country} is {capital}."))
    for c in w.cities:
        facts += [
            (c.name, f"{c.name} is a city in {c.country}."),
            (c.name, f"The population of {c.name} is {c.population:,}."),
            (c.name, f"{c.name} has an area of {c.area_km2} square kilometres."),
            (c.name, f"{c.name} was founded in {c.founded}."),
        ]
    for p in w.people:
        facts += [
            (p.name, f"{p.name} is a {p.profession} who was born in {p.birth_year}."),
            (p.name, f"{p.name} was born in the city of {p.born_in}."),
        ]
    w.passages = [Passage(f"p{i:04d}", title, text) for i, (title, text) in enumerate(facts)]
    return w


@dataclass
class Question:
    """A question, its ground truth(s) (strings), its kind and the scorer source."""

    text: str
    answers: list[str]
    kind: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


def _split(items: list[Any], split: str) -> list[Any]:
    """Every fifth item (from the first) is held out for evaluation; the rest are for training."""
    held = [x for i, x in enumerate(items) if i % 5 == 0]
    return held if split == "eval" else [x for i, x in enumerate(items) if i % 5 != 0] or held


def make_question(world: World, kind: str, rng: random.Random, split: str = "train") -> Question:
    """One question of ``kind`` drawn with ``rng``. Search questions of ``split`` "eval" ask
    about held-out entities (every fifth city, country and person), never asked in training;
    the encyclopaedia holds the facts of all of them."""
    city_of = {c.name: c for c in world.cities}
    cities, people = _split(world.cities, split), _split(world.people, split)
    countries = _split(list(world.countries), split)
    if kind == "lookup":
        c = rng.choice(cities)
        if rng.random() < 0.5:
            return Question(f"What is the population of {c.name}?", [str(c.population)], kind, "calculator")
        return Question(f"In which year was {c.name} founded?", [str(c.founded)], kind, "calculator")
    if kind == "two_hop":
        if rng.random() < 0.5:
            country = rng.choice(countries)
            capital = city_of[world.countries[country]]
            text = f"What is the population of the capital of {country}?"
            return Question(text, [str(capital.population)], kind, "calculator")
        p = rng.choice(people)
        return Question(f"In which country was {p.name} born?", [city_of[p.born_in].country], kind, "nq")
    if kind == "lookup_compute":
        c = rng.choice(cities)
        density = round(c.population / c.area_km2, 1)
        text = f"What is the population density of {c.name} in people per square kilometre, rounded to one decimal?"
        return Question(text, [f"{density:.1f}"], kind, "calculator")
    if kind == "product":
        a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
        return Question(f"What is {a} * {b}?", [str(a * b)], kind, "calculator")
    if kind == "list_sum":
        xs = [rng.randint(100, 9999) for _ in range(12)]
        text = f"What is the sum of these numbers: {', '.join(map(str, xs))}?"
        return Question(text, [str(sum(xs))], kind, "calculator")
    raise ValueError(f"unknown question kind {kind!r}")


__all__ = ["KINDS", "City", "Person", "Question", "World", "build_world", "make_question"]
