"""The GRPO-family methods beyond GRPO, as the config settings that switch each on, and the trainer
kinds that run it. ``docs/algorithms.md`` shows this table; ``tests/trainers/test_method_matrix.py``
checks it: every method runs one step in a recipe of each kind listed, and is refused at config
load by the other kinds' recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the trainer kinds, and the recipe of each that the matrix test runs
KIND_RECIPES: dict[str, str] = {
    "token": "configs/quickstart.yaml",
    "denoising": "configs/diffusion_demo.yaml",
    "noise": "configs/find.yaml",
    "environment": "configs/ript_vla_continuous.yaml",
    "series": "configs/airquality_grpo.yaml",
}


@dataclass(frozen=True)
class Method:
    """One method: its name, the paper, the config settings that switch it on (``key=value``
    overrides, as on the command line) and the trainer kinds that run it."""

    name: str
    paper: str
    settings: tuple[str, ...]
    kinds: tuple[str, ...]
    note: str = ""
    #: the token recipe to run it in, when the kind's default recipe's task cannot (HiPO's template)
    token_recipe: str | None = None

    def recipe(self, kind: str) -> str:
        return self.token_recipe if kind == "token" and self.token_recipe else KIND_RECIPES[kind]


ALL_KINDS = tuple(KIND_RECIPES)
_LOSS = ("algorithm.loss_options={}",)  # a loss switch drops the recipe's options of its old loss

METHODS: tuple[Method, ...] = (
    Method("gtpo", "GTPO, arXiv 2508.04349", ("algorithm.advantage=gtpo",), ("token",)),
    Method("grpo_s", "GRPO-S of GTPO, arXiv 2508.04349", ("algorithm.advantage=grpo_s",), ("token",)),
    Method(
        "grpo_scaling",
        "DR-IRL, arXiv 2503.18991",
        ("algorithm.advantage=grpo_scaling",),
        ("token",),
        "needs a task that writes demonstrations",
    ),
    Method("seed_grpo", "SEED-GRPO, arXiv 2505.12346", ("algorithm.advantage=seed_grpo",), ("token",)),
    Method("hapo_tlga", "HAPO, arXiv 2509.16591", ("algorithm.advantage=hapo_tlga",), ("token", "environment")),
    Method("hapo", "HAPO, arXiv 2509.16591", ("algorithm.loss=hapo", *_LOSS), ("token",)),
    Method(
        "rollout.adaptive_temperature",
        "HAPO, arXiv 2509.16591",
        ("rollout.adaptive_temperature={tau: 0.05}",),
        ("token",),
        "hf engine, single-turn rollouts",
    ),
    Method("simko", "SimKO, arXiv 2510.14807", ("algorithm.loss=simko", *_LOSS), ("token",)),
    Method("copo", "COPO, arXiv 2508.04138", ("algorithm.advantage=copo",), ALL_KINDS),
    Method("capo", "CAPO, arXiv 2510.00819", ("algorithm.filters=[{name: capo}]",), ("token",)),
    Method(
        "srft",
        "SRFT, arXiv 2506.19767",
        ("algorithm.loss=srft", *_LOSS),
        ("token",),
        "needs a task that writes demonstrations",
    ),
    Method(
        "spectral_po",
        "Spectral PO, arXiv 2505.11595",
        ("algorithm.advantage=spectral_po", "algorithm.advantage_options={judge: {name: numeric}}"),
        ("token",),
    ),
    Method("vade", "VADE, arXiv 2511.18902", ("rollout.prompt_sampler=vade",), ALL_KINDS),
    Method(
        "bnpo decompose",
        "BNPO, arXiv 2506.02864",
        ("algorithm.advantage=bnpo", "algorithm.advantage_options={decompose: true}"),
        ("token", "denoising", "noise"),
    ),
    Method(
        "conciser_length",
        "ConciseR, arXiv 2505.21178",
        ("algorithm.filters=[{name: conciser_length, start_step: 1}]",),
        ("token",),
    ),
    Method(
        "hipo",
        "HiPO, arXiv 2509.23967",
        ("task.hipo.enabled=true", "task.template=think", "algorithm.advantage=hipo"),
        ("token",),
        "vlm_reasoning's think-on / think-off template",
        token_recipe="configs/pathology_demo.yaml",
    ),
    Method("d3s", "D3S, arXiv 2509.22115", ("algorithm.filters=[{name: d3s}]",), ("token",)),
    Method(
        "cppo_prune refill",
        "CPPO, arXiv 2503.22342",
        ("algorithm.filters=[{name: cppo_prune, prune_ratio: 0.5, refill: true}]",),
        ("token",),
    ),
    Method("lspo refill", "LSPO, arXiv 2510.01459", ("algorithm.filters=[{name: lspo, refill: true}]",), ("token",)),
)


def kind_settings(kind: str) -> tuple[str, ...]:
    """Settings a kind's recipe needs before a method applies (FIND reads algorithm.advantage only
    with its group baseline)."""
    return ("task.baseline=group",) if kind == "noise" else ()


__all__ = ["ALL_KINDS", "KIND_RECIPES", "METHODS", "Method", "kind_settings"]
