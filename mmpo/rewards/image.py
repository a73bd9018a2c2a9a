"""Image reward components for text-to-image RL (diffusion plugins), registered in ``IMAGE_REWARDS``.

Every component is a class built from keyword options (a dataclass) and called as

    ``component(images [N, 3, H, W] float32 RGB in [0, 1], prompts: N strings, metas: N dicts) -> [N]``

returning float32 rewards (higher is better) on the images' device. ``metas[i]`` holds the
per-prompt data of row ``i`` (e.g. ``{"color": "red"}`` from a JSONL prompt file).

A config lists components as ``rewards: [{name: target_color, weight: 1.0, meta_key: color}, ...]``;
:func:`build_image_rewards` validates the list and returns an :class:`ImageRewardSet` whose call
computes every component and combines them with :func:`mmpo.rewards.combine.weighted_sum`
(``workers: ray`` scores a component in Ray actors, :mod:`mmpo.rewards.ray_scorer`;
every component is logged under its key: ``key:`` if given, else its name, with suffixes
``_1, _2, ...`` when a name occurs more than once).

Registered here (importing this module registers them all; open_clip and requests are imported
only when a component needs them): ``target_color``, ``brightness``, ``shape_at``
(:mod:`mmpo.rewards.image_verifiable`), ``clip_score`` (:mod:`mmpo.rewards.clip_score`),
``reward_server`` (:mod:`mmpo.rewards.reward_server`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

import torch

from mmpo.errors import ConfigError, UnknownNameError
from mmpo.rewards.combine import weighted_sum
from mmpo.rewards.image_component import (
    IMAGE_REWARDS,
    ImageReward,
    Metas,
    OptionError,
    check_batch,
    component_options,
    float_option,
    str_option,
)
from mmpo.rewards.ray_scorer import WORKER_KEYS, with_workers
from mmpo.tasks import RewardOutput

_SPEC_KEYS = ("name", "weight", "key")


class ImageRewardSet:
    """Weighted image reward components; ``__call__`` -> :class:`mmpo.tasks.RewardOutput`.

    ``components`` maps each key (the name logged) to its component, ``weights`` each key to
    its weight. ``rewards [N] = sum_k weights[k] * components[k](images, prompts, metas)``.
    """

    def __init__(self, components: Mapping[str, ImageReward], weights: Mapping[str, float]) -> None:
        self.components, self.weights = dict(components), dict(weights)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metas: Metas | None = None) -> RewardOutput:
        """images [N, 3, H, W] in [0, 1], N prompts, N metas (or None) -> RewardOutput (rewards [N], components)."""
        metas = check_batch(images, prompts, metas)
        n, out = images.shape[0], {}
        for key, comp in self.components.items():
            r = torch.as_tensor(comp(images, list(prompts), metas))
            if tuple(r.shape) != (n,):
                raise ValueError(f"image reward '{key}' returned shape {tuple(r.shape)}, expected [{n}]")
            out[key] = r.to(device=images.device, dtype=torch.float32)
        return weighted_sum(out, self.weights)

    def __repr__(self) -> str:
        return f"ImageRewardSet({', '.join(f'{k}*{w:g}' for k, w in self.weights.items())})"


def build_image_rewards(specs: Sequence[Mapping[str, Any]], where: str = "task.rewards") -> ImageRewardSet:
    """Build an :class:`ImageRewardSet` from config specs ``[{name, weight=1.0, key=None, **options}]``.

    Every problem is a ConfigError naming ``<where>[i]`` (and the key): not a dict, missing or
    unknown ``name``, bad ``weight``, unknown option (listing the valid ones), missing required
    option, bad option value, duplicate ``key``.
    """
    if isinstance(specs, Mapping) or not isinstance(specs, Sequence) or isinstance(specs, str) or not specs:
        raise ConfigError(f"{where} must be a non-empty list of {{name: ..., weight: ...}} entries, got {specs!r}")
    built: list[tuple[str, str | None, ImageReward, float]] = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{at} must be a mapping like {{name: target_color, weight: 1.0}}, got {spec!r}")
        if "name" not in spec:
            raise ConfigError(f"{at}.name is missing; valid names: {', '.join(IMAGE_REWARDS.names())}")
        name = spec["name"]
        try:
            cls = IMAGE_REWARDS.get(name)
        except UnknownNameError as exc:
            raise UnknownNameError(f"{at}.name: {exc}") from None
        try:
            weight = float_option(spec.get("weight", 1.0), "weight")
            key = str_option(spec.get("key"), "key", optional=True)
        except OptionError as exc:
            raise ConfigError(f"{at}.{exc}") from None
        options = {k: v for k, v in spec.items() if k not in (*_SPEC_KEYS, *WORKER_KEYS)}  # workers: ray_scorer
        valid, required = component_options(cls)
        for k in options:
            if k not in valid:
                raise ConfigError(
                    f"{at}.{k}: unknown option of image reward '{name}'; valid options: "
                    f"{', '.join([*_SPEC_KEYS, *valid, *WORKER_KEYS])}"
                )
        absent = [k for k in required if k not in options]
        if absent:
            raise ConfigError(f"{at}.{absent[0]} is required for image reward '{name}'")
        try:
            comp = cls(**options)
        except OptionError as exc:
            raise ConfigError(f"{at}.{exc.option}: {exc.why}") from None
        except ConfigError as exc:
            raise ConfigError(f"{at} ({name}): {exc}") from None
        built.append((name, key, with_workers(comp, spec, at), weight))

    explicit = [k for _, k, _, _ in built if k is not None]
    dup = [k for k, c in Counter(explicit).items() if c > 1]
    if dup:
        raise ConfigError(f"{where}: key {dup[0]!r} is used by more than one reward; keys must be unique")
    counts = Counter(name for name, key, _, _ in built if key is None)
    seen: Counter = Counter()
    components: dict[str, ImageReward] = {}
    weights: dict[str, float] = {}
    for i, (name, key, comp, weight) in enumerate(built):
        if key is None:
            seen[name] += 1
            key = f"{name}_{seen[name]}" if counts[name] > 1 else name
        if key in components:
            raise ConfigError(f"{where}[{i}]: reward key {key!r} clashes with another reward; set distinct `key:`s")
        components[key], weights[key] = comp, weight
    return ImageRewardSet(components, weights)


# Register the components (their modules import only mmpo.rewards.image_component).
from mmpo.rewards import clip_score, image_verifiable, reward_server  # noqa: E402,F401

__all__ = [
    "IMAGE_REWARDS",
    "ImageReward",
    "ImageRewardSet",
    "Metas",
    "OptionError",
    "build_image_rewards",
    "check_batch",
    "component_options",
]
