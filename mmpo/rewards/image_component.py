"""The contract of an image reward component and its registry, ``IMAGE_REWARDS``.

A component is a class built from keyword options and called as
``component(images [N, 3, H, W] float32 RGB in [0, 1], prompts: N strings, metas: N dicts) -> [N]``.
Components live in their own modules (:mod:`mmpo.rewards.image_verifiable`,
:mod:`mmpo.rewards.clip_score`, :mod:`mmpo.rewards.reward_server`) and import only this one;
:mod:`mmpo.rewards.image` combines them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch

from mmpo.core.registry import Registry
from mmpo.errors import ConfigError

IMAGE_REWARDS: Registry = Registry("image reward")
Metas = Sequence[Mapping[str, Any]]  # N per-prompt dicts


class OptionError(ConfigError):
    """A component option has a wrong value; ``str()`` is ``"<option>: <why>"``."""

    def __init__(self, option: str, why: str) -> None:
        self.option, self.why = option, why
        super().__init__(f"{option}: {why}")


class ImageReward(abc.ABC):
    """Base class of image reward components (subclasses are dataclasses of their options)."""

    @abc.abstractmethod
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metas: Metas) -> torch.Tensor:
        """images [N, 3, H, W] float in [0, 1], N prompts, N metas -> rewards [N] float32."""

    def meta_keys(self) -> frozenset[str] | None:
        """The keys of a prompt's meta this component reads (a prompt row's other keys are unknown,
        see :mod:`mmpo.data_rows`): by default the values of its ``*_key`` options (``meta_key``,
        ``box_key``, ...); None when it may read any key (e.g. a reward server gets whole rows)."""
        if not dataclasses.is_dataclass(self):
            return frozenset()
        values = (getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith("_key"))
        return frozenset(v for v in values if isinstance(v, str))


def component_options(cls: type) -> tuple[list[str], list[str]]:
    """(all option names, required option names) of a component class (its dataclass init fields)."""
    fields = [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    missing = dataclasses.MISSING
    required = [f.name for f in fields if f.default is missing and f.default_factory is missing]
    return [f.name for f in fields], required


# ---- option checks shared by the components (raise OptionError naming the option) ----


def float_option(value: Any, option: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite number within [lo, hi] (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(option, f"must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise OptionError(option, f"must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def int_option(value: Any, option: str, lo: int = 1) -> int:
    """An integer >= lo (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise OptionError(option, f"must be an integer >= {lo}, got {value!r}")
    return value


def str_option(value: Any, option: str, optional: bool = False) -> str | None:
    """A non-empty string (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise OptionError(option, f"must be a non-empty string, got {value!r}")
    return value


def check_batch(images: torch.Tensor, prompts: Sequence[str], metas: Metas | None) -> list[Mapping[str, Any]]:
    """Validate a batch (images [N, 3, H, W] floating, N prompts, N metas); returns the metas (``None`` -> N ``{}``)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [N, 3, H, W] (RGB in [0, 1]), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    n = images.shape[0]
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts")
    metas = [{} for _ in range(n)] if metas is None else list(metas)
    if len(metas) != n:
        raise ValueError(f"got {n} images but {len(metas)} metas")
    bad = [i for i, m in enumerate(metas) if not isinstance(m, Mapping)]
    if bad:
        raise ValueError(f"metas must be dicts; metas[{bad[0]}] is {type(metas[bad[0]]).__name__}")
    return metas


__all__ = [
    "IMAGE_REWARDS",
    "ImageReward",
    "Metas",
    "OptionError",
    "check_batch",
    "component_options",
    "float_option",
    "int_option",
    "str_option",
]
