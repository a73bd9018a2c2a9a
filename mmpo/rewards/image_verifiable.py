"""Verifiable image rewards that need no model: ``target_color``, ``brightness``, ``shape_at``.

They are exact, deterministic functions of the pixels, so a CPU demo can show a diffusion
policy learning honestly. All take ``images [N, 3, H, W]`` (RGB, clamped to [0, 1] before
scoring), ``prompts`` (unused) and ``metas`` (per-row targets), and return float32 ``[N]``.

Colours are an ``[r, g, b]`` list in [0, 1] or a name of :data:`COLORS` (case-insensitive).
Boxes are ``[x0, y0, x1, y1]`` normalised to [0, 1] (x to the right, y down, ``x0 < x1``,
``y0 < y1``); pixel ``(row j, column k)`` of an ``H x W`` image is inside the box when its
centre ``((k + 0.5) / W, (j + 0.5) / H)`` satisfies ``x0 <= x < x1`` and ``y0 <= y < y1``
(so ``[0.25, 0.25, 0.75, 0.75]`` on 8 x 8 is rows/columns 2..5). A box that contains no
pixel centre along an axis uses the single pixel under its centre along that axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from mmpo.errors import ConfigError
from mmpo.rewards.image_component import (
    IMAGE_REWARDS,
    ImageReward,
    Metas,
    OptionError,
    check_batch,
    float_option,
    str_option,
)

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 0.5),
}
LUMA_601 = (0.299, 0.587, 0.114)  # Rec. 601 luma weights (sum to 1)
_SQRT3 = math.sqrt(3.0)


def parse_color(value: Any, where: str) -> tuple[float, float, float]:
    """A colour name of :data:`COLORS` or ``[r, g, b]`` in [0, 1] -> (r, g, b); ConfigError naming ``where``."""
    if isinstance(value, str):
        rgb = COLORS.get(value.strip().lower())
        if rgb is None:
            names = ", ".join(COLORS)
            raise ConfigError(f"{where}: unknown colour {value!r}; valid names: {names} (or [r, g, b] in 0..1)")
        return rgb
    if isinstance(value, (list, tuple)) and len(value) == 3:
        try:
            return tuple(float_option(v, where, 0.0, 1.0) for v in value)  # type: ignore[return-value]
        except OptionError:
            pass
    raise ConfigError(f"{where}: a colour must be a name ({', '.join(COLORS)}) or [r, g, b] in 0..1, got {value!r}")


def parse_box(value: Any, where: str) -> tuple[float, float, float, float]:
    """``[x0, y0, x1, y1]`` in [0, 1] with x0 < x1, y0 < y1 -> tuple; ConfigError naming ``where``."""
    ok = isinstance(value, (list, tuple)) and len(value) == 4
    if ok:
        try:
            box = tuple(float_option(v, where, 0.0, 1.0) for v in value)
        except OptionError:
            ok = False
    if not ok or not (box[0] < box[2] and box[1] < box[3]):
        raise ConfigError(f"{where}: a box must be [x0, y0, x1, y1] in 0..1 with x0 < x1 and y0 < y1, got {value!r}")
    return box  # type: ignore[return-value]


def _option(parse, value: Any, option: str):
    """Parse an option value, turning the ConfigError into an OptionError naming the option."""
    if value is None:
        return None
    try:
        return parse(value, option)
    except ConfigError as exc:
        raise OptionError(option, str(exc).split(": ", 1)[1]) from None


def _per_row(parse, metas: Sequence[Mapping[str, Any]], key: str | None, default, what: str, device) -> torch.Tensor:
    """Per-row targets from ``metas[i][key]`` (else ``default``) -> float tensor [N, len(target)]."""
    rows = []
    for i, meta in enumerate(metas):
        if key is not None and key in meta:
            rows.append(parse(meta[key], f"{what}: metas[{i}][{key!r}]"))
        elif default is not None:
            rows.append(default)
        else:
            raise ConfigError(f"{what}: metas[{i}] has no {key!r} (and no default is set); keys: {sorted(meta)}")
    return torch.tensor(rows, dtype=torch.float64, device=device)


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel-centre membership of boxes: boxes [N, 4] (x0, y0, x1, y1 in [0, 1]) -> bool [N, H, W].

    Along an axis with no pixel centre in ``[lo, hi)`` the pixel under the box centre is used.
    """

    def axis(lo: torch.Tensor, hi: torch.Tensor, size: int) -> torch.Tensor:  # [N] -> [N, size]
        centres = (torch.arange(size, device=lo.device, dtype=torch.float64) + 0.5) / size
        inside = (centres >= lo[:, None]) & (centres < hi[:, None])
        mid = ((lo + hi) / 2 * size).floor().long().clamp(0, size - 1)
        fallback = torch.nn.functional.one_hot(mid, size).bool()
        return torch.where(inside.any(dim=1, keepdim=True), inside, fallback)

    b = boxes.to(torch.float64)
    return axis(b[:, 1], b[:, 3], height)[:, :, None] & axis(b[:, 0], b[:, 2], width)[:, None, :]


def color_match(images: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``1 - ||pixel - rgb|| / sqrt(3)`` in [0, 1]: images [N, 3, H, W], rgb [N, 3] -> [N, H, W]."""
    diff = images.clamp(0, 1) - rgb.to(images.dtype)[:, :, None, None]
    return 1 - diff.pow(2).sum(dim=1).sqrt() / _SQRT3


@IMAGE_REWARDS.register("target_color")
@dataclass
class TargetColor(ImageReward):
    """``1 - ||mean RGB - target RGB|| / sqrt(3)`` in [0, 1] (1 = the mean colour is the target).

    The mean is over the whole image or over ``region`` (a box, see the module docstring).
    Options: ``rgb`` (colour name or [r, g, b]; the default target), ``meta_key`` (take the
    target of row i from ``metas[i][meta_key]``, falling back to ``rgb``), ``region``.
    E.g. a pure red image scores 1 for "red" and ``1 - sqrt(2/3)`` for "blue".
    """

    rgb: Any = None
    meta_key: str | None = None
    region: Any = None

    def __post_init__(self) -> None:
        self.rgb = _option(parse_color, self.rgb, "rgb")
        self.meta_key = str_option(self.meta_key, "meta_key", optional=True)
        self.region = _option(parse_box, self.region, "region")
        if self.rgb is None and self.meta_key is None:
            raise OptionError("rgb", "set rgb (a colour) or meta_key (the metas key holding each prompt's colour)")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metas: Metas) -> torch.Tensor:
        """images [N, 3, H, W] -> [N] float32."""
        metas = check_batch(images, prompts, metas)
        n, _, h, w = images.shape
        target = _per_row(parse_color, metas, self.meta_key, self.rgb, "target_color", images.device)
        x = images.clamp(0, 1).to(torch.float64)
        if self.region is None:
            mean = x.mean(dim=(2, 3))
        else:
            mask = box_mask(torch.tensor([self.region] * n, device=images.device), h, w)[:, None]
            mean = (x * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3))
        return (1 - (mean - target).norm(dim=1) / _SQRT3).float()


@IMAGE_REWARDS.register("brightness")
@dataclass
class Brightness(ImageReward):
    """Mean Rec. 601 luma ``L = mean(0.299 R + 0.587 G + 0.114 B)`` in [0, 1].

    Option ``target`` (in [0, 1]): reward ``1 - |L - target|`` instead of ``L``.
    """

    target: float | None = None

    def __post_init__(self) -> None:
        if self.target is not None:
            self.target = float_option(self.target, "target", 0.0, 1.0)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metas: Metas) -> torch.Tensor:
        """images [N, 3, H, W] -> [N] float32."""
        check_batch(images, prompts, metas)
        weights = torch.tensor(LUMA_601, dtype=torch.float64, device=images.device)
        pixels = images.shape[2] * images.shape[3]
        lum = torch.einsum("nchw,c->n", images.clamp(0, 1).to(torch.float64), weights) / pixels
        return (lum if self.target is None else 1 - (lum - self.target).abs()).float()


@IMAGE_REWARDS.register("shape_at")
@dataclass
class ShapeAt(ImageReward):
    """ "A <colour> shape at <position>": contrast of the colour match inside a box vs outside it.

    With the per-pixel match ``m(p) = 1 - ||p - c|| / sqrt(3)`` in [0, 1] (c the target colour),
    reward ``= mean_{p in box} m(p) - mean_{p outside box} m(p)`` in [-1, 1] (the outside term
    is 0 when the box covers every pixel). High when the target colour fills the box and is
    absent elsewhere: e.g. on 8 x 8 black with box [0.5, 0.5, 1, 1] exactly red and c red,
    ``1 - (1 - 1/sqrt(3)) = 1/sqrt(3)`` (on cyan, red's complement: 1); the same red square moved
    to [0, 0, 0.5, 0.5] scores ``-1 / (3 sqrt(3))``.

    Options: ``box`` ([x0, y0, x1, y1]) or ``box_key`` (row i's box from ``metas[i][box_key]``,
    falling back to ``box``); ``rgb`` (colour name or [r, g, b], default white = "a bright shape")
    or ``color_key`` (row i's colour from ``metas[i][color_key]``, falling back to ``rgb``).
    """

    box: Any = None
    box_key: str | None = None
    rgb: Any = "white"
    color_key: str | None = None

    def __post_init__(self) -> None:
        self.box = _option(parse_box, self.box, "box")
        self.box_key = str_option(self.box_key, "box_key", optional=True)
        self.rgb = _option(parse_color, self.rgb, "rgb")
        self.color_key = str_option(self.color_key, "color_key", optional=True)
        if self.box is None and self.box_key is None:
            why = "set box ([x0, y0, x1, y1] in 0..1) or box_key (the metas key holding each prompt's box)"
            raise OptionError("box", why)
        if self.rgb is None and self.color_key is None:
            raise OptionError("rgb", "set rgb (a colour) or color_key (the metas key holding each prompt's colour)")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metas: Metas) -> torch.Tensor:
        """images [N, 3, H, W] -> [N] float32."""
        metas = check_batch(images, prompts, metas)
        _, _, h, w = images.shape
        boxes = _per_row(parse_box, metas, self.box_key, self.box, "shape_at", images.device)
        rgb = _per_row(parse_color, metas, self.color_key, self.rgb, "shape_at", images.device)
        match = color_match(images.to(torch.float64), rgb)  # [N, H, W]
        inside = box_mask(boxes, h, w).to(torch.float64)
        n_in, n_out = inside.sum(dim=(1, 2)), (1 - inside).sum(dim=(1, 2))
        mean_in = (match * inside).sum(dim=(1, 2)) / n_in
        mean_out = (match * (1 - inside)).sum(dim=(1, 2)) / n_out.clamp(min=1)
        return (mean_in - mean_out).float()


__all__ = [
    "COLORS",
    "LUMA_601",
    "Brightness",
    "ShapeAt",
    "TargetColor",
    "box_mask",
    "color_match",
    "parse_box",
    "parse_color",
]
