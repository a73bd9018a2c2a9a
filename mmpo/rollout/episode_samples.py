"""A logged environment rollout (every environment task: RIPT-VLA, MiniWoB GRPO, ScreenExplorer):
its row (:func:`episode_row`: the actions taken as text, the outcome) and its picture, an animated
GIF of the episode with the action taken drawn on each frame (:func:`episode_gif`).

Frames are the observation images the policy saw (:attr:`mmpo.rollout.env_runner.Episode.observations`,
kept by ``EnvRunner.run(..., keep_images=True)``): frame ``t`` is the observation action ``t`` was
taken on, captioned ``step t+1/T: <action>`` (and, for a click, a red ring at the point), then a
last frame with the final observation and the outcome. Tiny observations (a 56 px MiniGrid view)
are enlarged by an integer factor with nearest-neighbour sampling to at least ``min_side`` pixels;
longer episodes keep ``max_frames`` frames spread evenly over the episode, the first and last included.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from mmpo.captions import mark_point, upscale, with_caption
from mmpo.rollout.env_runner import Episode
from mmpo.samples import SampleRow

#: the shorter side of a frame is upscaled (nearest) to at least this many pixels
MIN_SIDE = 128
#: at most this many frames per GIF
MAX_FRAMES = 64


def frame_indices(n: int, cap: int) -> list[int]:
    """``range(n)`` when ``n <= cap``, else ``cap`` indices spread evenly from 0 to ``n - 1`` (both kept)."""
    if n <= cap:
        return list(range(n))
    if cap <= 1:
        return [n - 1][:cap]
    return sorted({round(k * (n - 1) / (cap - 1)) for k in range(cap)})


def caption_frames(
    images: Sequence[np.ndarray],
    captions: Sequence[Sequence[str]],
    points: Sequence[tuple[float, float] | None] | None = None,
    *,
    min_side: int = MIN_SIDE,
    max_frames: int = MAX_FRAMES,
) -> list[Any]:
    """PIL frames of ``images`` (``[H, W, 3]`` uint8 each) upscaled to ``min_side``, with
    ``captions[i]`` (lines) under frame ``i`` and a ring at normalised ``points[i]`` (None: no
    mark); at most ``max_frames`` of them (:func:`frame_indices`). Every frame has the size of the
    first (an image of another size is resized to it) and room for the longest caption."""
    from PIL import Image

    if len(captions) != len(images) or (points is not None and len(points) != len(images)):
        raise ValueError(f"{len(images)} images need as many captions and points")
    keep = frame_indices(len(images), max_frames)
    lines = max((len(captions[i]) for i in keep), default=0)
    size: tuple[int, int] | None = None
    frames = []
    for i in keep:
        image = upscale(Image.fromarray(np.ascontiguousarray(images[i], dtype=np.uint8)), min_side)
        if size is None:
            size = image.size
        elif image.size != size:
            image = image.resize(size, Image.NEAREST)
        point = points[i] if points is not None else None
        if point is not None:
            mark_point(image, *point)
        frames.append(with_caption(image, list(captions[i]), num_lines=lines))
    return frames


def episode_gif(
    ep: Episode,
    *,
    label: Callable[[Any], str],
    outcome: str,
    point: Callable[[Any], tuple[float, float] | None] | None = None,
    min_side: int = MIN_SIDE,
    max_frames: int = MAX_FRAMES,
) -> list[Any]:
    """The GIF frames (PIL, for :class:`mmpo.samples.SampleRow` media) of ``ep``: ``ep.length + 1``
    frames (or ``max_frames``), each headed by the instruction; ``label(env_action)`` names an
    action (``None`` is a no-op), ``point(env_action)`` its click point in [0, 1]^2 or None, and
    ``outcome`` goes on the last frame. ``ep`` must have its observations (``keep_images``)."""
    if len(ep.observations) != ep.length + 1:
        raise ValueError(
            f"episode of seed {ep.seed} has {len(ep.observations)} observations for {ep.length} steps; "
            "run it with keep_images=True"
        )
    T = ep.length
    captions = [[ep.instruction, f"step {t + 1}/{T}: {label(s.env_action)}"] for t, s in enumerate(ep.steps)]
    captions.append([ep.instruction, f"end: {outcome}"])
    points = [point(s.env_action) if point is not None else None for s in ep.steps] + [None]
    return caption_frames(
        [o.image for o in ep.observations], captions, points, min_side=min_side, max_frames=max_frames
    )


def episode_row(
    ep: Episode,
    *,
    prompt: str,
    group: int,
    reward: float,
    advantage: float,
    components: dict[str, float],
    label: Callable[[Any], str],
    point: Callable[[Any], tuple[float, float] | None] | None = None,
    trained: bool = True,
) -> SampleRow:
    """The logged row of ``ep``: ``prompt`` (what it was asked), as completion the actions taken
    (``label`` of each, comma-separated) and the outcome (``-> success, return R``, the invalid
    actions, and ``(not trained this step)`` unless ``trained``), and its GIF (:func:`episode_gif`)."""
    outcome = f"{'success' if ep.success else 'failure'}, return {ep.env_return:.3g}"
    if ep.invalid_actions:
        outcome += f", {ep.invalid_actions} invalid"
    actions = ", ".join(label(s.env_action) for s in ep.steps)
    note = "" if trained else " (not trained this step)"
    return SampleRow(
        prompt_id=str(ep.seed),
        group=group,
        prompt=prompt,
        completion=f"{actions} -> {outcome}{note}",
        reward=float(reward),
        advantage=float(advantage),
        components=components,
        media=[episode_gif(ep, label=label, outcome=outcome, point=point)],
    )


__all__ = ["MAX_FRAMES", "MIN_SIDE", "caption_frames", "episode_gif", "episode_row", "frame_indices"]
