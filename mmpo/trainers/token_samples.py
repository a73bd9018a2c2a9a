"""What a token rollout shows a reader: its prompt (user text and images), its completion (an
agent's turns with each tool call and result) and the logged rows of a step
(:class:`mmpo.samples.SampleRow`, see :mod:`mmpo.samples`).

Rows are built only for the rollouts chosen to be logged (whole groups first, by
:meth:`mmpo.trainers.loop.TrainerBase.sample_indices`), so ``trainer.log_samples: 0`` costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmpo.samples import SampleRow

#: image file suffixes kept as files (what ``mmpo.samples.save_media`` copies and a browser shows);
#: other image files are decoded and re-encoded as PNG
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".gif")


def _parts(messages: list[dict[str, Any]], role: str | None) -> list[Any]:
    """The content parts of ``messages`` (of ``role`` only when given); a str content is one text part."""
    out: list[Any] = []
    for m in messages:
        if role is not None and m.get("role") != role:
            continue
        content = m.get("content")
        out.extend([{"type": "text", "text": content}] if isinstance(content, str) else content or [])
    return out


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The user text of chat ``messages`` (images and videos left out), parts joined by newlines;
    all messages' text when none has the user role."""
    parts = _parts(messages, "user") or _parts(messages, None)
    texts = [p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    return "\n".join(t for t in texts if t)


def _image(value: Any) -> Any:
    """An image part's value as a PIL image or an image file path (``IMAGE_FILES``; another local
    image file is decoded); None for anything else (a URL, base64 text)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, (str, Path)):
        return None
    path = Path(str(value).removeprefix("file://")).expanduser()
    if not path.is_file():
        return None
    if path.suffix.lower() in IMAGE_FILES:
        return str(path.resolve())
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        return None


def prompt_media(messages: list[dict[str, Any]]) -> list[Any]:
    """The images of the user turns, in order and at their own size: a PIL image or an image
    file path per image part; a video part as its list of PIL frames (a GIF when logged)."""
    from PIL import Image

    out: list[Any] = []
    for part in _parts(messages, "user"):
        if not isinstance(part, dict):
            continue
        if part.get("type") == "image":
            image = _image(part.get("image"))
            if image is not None:
                out.append(image)
        elif part.get("type") == "video" and isinstance(part.get("video"), (list, tuple)):
            frames = [f for f in part["video"] if isinstance(f, Image.Image)]
            if frames:
                out.append(frames)
    return out


def image_refs(media: list[Any], files: list[str | None] | None = None) -> list[Any]:
    """``media`` (from :func:`prompt_media`) for an evaluation row's ``images``: ``files[i]``,
    when given and not None, names the file ``media[i]`` was read from and replaces it if it is
    one of ``IMAGE_FILES``; paths stay paths, images stay images (``write_evaluation`` saves them)."""
    out: list[Any] = []
    for i, item in enumerate(media):
        source = files[i] if files is not None and i < len(files) else None
        ok = source is not None and Path(source).suffix.lower() in IMAGE_FILES and Path(source).is_file()
        out.append(str(Path(source).resolve()) if ok else item)
    return out


def row_advantage(advantages: torch.Tensor, mask: torch.Tensor, i: int) -> float:
    """Row ``i``'s advantage: ``advantages [N]``, or the mean over its action tokens of ``advantages [N, T]``."""
    a = advantages[i].float()
    if a.dim() == 0:
        return float(a)
    m = mask[i, : a.shape[0]].float()
    return float((a[: m.shape[0]] * m).sum() / m.sum().clamp(min=1.0))


def completion_and_images(batch: Any, i: int, first_image: int) -> tuple[str, list[Any]]:
    """Row ``i``'s completion text and the images its tool results showed (agent rows: the
    transcript, images numbered from ``first_image``)."""
    if batch.trajectories:
        traj = batch.trajectories[i]
        return traj.transcript(first_image), traj.result_images()
    return batch.texts[i], []


def sample_rows(trainer: Any, batch: Any) -> list[SampleRow]:
    """The logged rows of a token step: ``batch`` is what the step trained on (a ``RolloutBatch``
    with advantages); rows chosen by ``trainer.sample_indices`` (whole groups first)."""
    if len(batch) == 0 or batch.advantages is None:
        return []
    chosen = trainer.sample_indices(batch.group_ids.tolist())
    if not chosen:
        return []
    task, differ = trainer.task, trainer.task.rollout_prompts_differ or bool(batch.trajectories)
    rows = []
    for i in chosen:
        sample = batch.samples[i]
        messages = task.rollout_messages(sample, int(batch.rollout_index[i])) if differ else sample.messages
        media = prompt_media(messages)
        completion, shown = completion_and_images(batch, i, len(media) + 1)
        rows.append(
            SampleRow(
                prompt_id=str(sample.id),
                group=int(batch.group_ids[i]),
                prompt=prompt_text(messages),
                completion=completion,
                reward=float(batch.rewards[i]),
                advantage=row_advantage(batch.advantages, batch.mask, i),
                components={k: float(v[i]) for k, v in batch.components.items()},
                media=media + shown,
            )
        )
    return rows


__all__ = ["IMAGE_FILES", "completion_and_images", "image_refs", "prompt_media", "prompt_text", "sample_rows"]
