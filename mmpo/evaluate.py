"""The one evaluator: held-out evaluation of a policy, during training and for ``mmpo eval``.

Each trainer kind supplies an :class:`Evaluator` (its held-out items, how its policy predicts
them, how predictions become metrics); this module shards the items over ranks, gathers the rows
and writes one layout:

- ``predictions.jsonl``: one JSON object per held-out item, ``{"id", "input", "prediction",
  "answer", ["completion", "options", "images",] <score>: float, ...}`` (``input``: the question,
  prompt, instruction or start time; ``prediction``: the answer given, image reference, actions
  or forecast; ``answer``: the reference when there is one; ``completion``: the whole text the
  policy wrote; ``options``: a multiple-choice item's options; ``images``: references to the
  item's images, a file path, or ``media/<row>_<k>.png`` (``.gif`` for frames) relative to the
  folder for an image the evaluator gave as a PIL image; then each score component of the item;
  keys starting with ``_`` travel with the gathered rows for the metrics but are not written);
- ``metrics.json``: the metrics over all items, with ``checkpoint`` (what was evaluated) and,
  in training, ``step``; per-category metrics are named ``<metric>/<category>``;
- the kind's pictures (image grids, episode GIFs, forecast plots) beside them.

``mmpo eval`` builds the evaluator from a checkpoint without an optimizer or a training engine
(``Trainer.checkpoint_evaluator``) and by default writes next to the checkpoint. Each evaluation
during training writes ``<run>/eval/step_<8-digit step>/`` (:func:`step_eval_dir`) on the main rank.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from mmpo.checkpoint import save_json, verify_model_folder
from mmpo.errors import ConfigError

#: the run folder's evaluations: ``mmpo eval``'s files at its top, in-training ones in ``step_<step>/``
EVAL_DIR = "eval"
STEP_PREFIX = "step_"
MEDIA_DIR = "media"


class Evaluator(Protocol):
    """What a trainer kind supplies to evaluate its policy on held-out items."""

    def items(self) -> list[Any]:
        """The held-out items, in a fixed order (samples, env seeds, prompts, start times)."""
        ...

    def predict(self, items: list[Any], offset: int) -> list[dict[str, Any]]:
        """One row (see the module docstring) per item; ``offset`` is the index of ``items[0]``
        among all items, so seeded sampling does not depend on how items are sharded."""
        ...

    def summarize(self, items: list[Any], rows: list[dict[str, Any]]) -> dict[str, float]:
        """The metrics over all items."""
        ...

    def write_artifacts(self, out_dir: Path, items: list[Any], rows: list[dict[str, Any]]) -> dict[str, str]:
        """Pictures beside the predictions (main rank only); ``{name: path}``."""
        ...


@dataclass
class EvalResult:
    items: list[Any]
    rows: list[dict[str, Any]]
    metrics: dict[str, float]


def run_evaluation(
    evaluator: Evaluator,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[Any], list[Any]] = lambda x: [x],
    chunk_size: int = 0,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Each rank predicts its contiguous share of the items; the rows are gathered in item order.
    A rank without items predicts the first one and drops it: every rank makes the same
    collective calls (generation under ZeRO-3 gathers parameters). With ``chunk_size`` > 0 a
    rank's share is predicted in that many items at a time (every rank the same number of
    chunks) and ``progress(n)`` is called after each chunk with its ``n`` items (a progress bar)."""
    items = evaluator.items()
    per_rank = math.ceil(len(items) / world_size) if items else 0
    first = rank * per_rank
    mine = items[first : first + per_rank]
    step = chunk_size if chunk_size > 0 else max(1, per_rank)
    rows: list[dict[str, Any]] = []
    for s in range(0, per_rank, step):
        part = mine[s : s + step]
        rows += evaluator.predict(part or items[:1], first + s if part else 0)[: len(part)]
        if progress is not None:
            progress(len(part))
    all_rows = [r for part in gather(rows) for r in part]
    metrics = evaluator.summarize(items[: len(all_rows)], all_rows) if all_rows else {}
    return EvalResult(items[: len(all_rows)], all_rows, metrics)


def write_evaluation(
    out_dir: Path, result: EvalResult, evaluator: Evaluator, checkpoint: str, *, step: int | None = None
) -> dict[str, Any]:
    """Write ``predictions.jsonl`` (atomically; the rows' images saved under ``media/``),
    ``metrics.json`` (with ``step`` when given) and the evaluator's pictures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / MEDIA_DIR, ignore_errors=True)  # an earlier evaluation's images
    pred_path = out_dir / "predictions.jsonl"
    tmp = pred_path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for i, row in enumerate(result.rows):  # keys starting with "_" travel with the rows but are not written
            out = {k: v for k, v in row.items() if not k.startswith("_")}
            if "images" in out:
                out["images"] = image_references(out["images"], out_dir, i)
            f.write(json.dumps(out, default=_jsonable) + "\n")
    tmp.replace(pred_path)
    artifacts = evaluator.write_artifacts(out_dir, result.items, result.rows)
    head = {"checkpoint": checkpoint} if step is None else {"checkpoint": checkpoint, "step": int(step)}
    save_json(out_dir / "metrics.json", {**head, **result.metrics})
    return {"metrics": result.metrics, "predictions": str(pred_path), **artifacts}


def image_references(images: list[Any], out_dir: Path, row: int) -> list[str]:
    """A row's ``images`` as references: a path stays as it is; an image (PIL; a list of them, the
    frames of a video) is saved as ``<out_dir>/media/<row>_<k>.png`` (``.gif``) and referenced
    relative to ``out_dir``."""
    from mmpo.samples import save_media

    refs = []
    for k, item in enumerate(images):
        if isinstance(item, (str, Path)):
            refs.append(str(item))
            continue
        (out_dir / MEDIA_DIR).mkdir(exist_ok=True)
        path = save_media(item, out_dir / MEDIA_DIR / f"{row:05d}_{k}")
        refs.append(path.relative_to(out_dir).as_posix())
    return refs


def step_eval_dir(run_dir: str | Path, step: int) -> Path:
    """Where the evaluation at training step ``step`` is written: ``<run>/eval/step_<8-digit step>``."""
    return Path(run_dir) / EVAL_DIR / f"{STEP_PREFIX}{int(step):08d}"


def write_step_evaluation(run_dir: str | Path, step: int, result: EvalResult, evaluator: Evaluator) -> dict[str, Any]:
    """:func:`write_evaluation` of the evaluation at training step ``step`` into
    :func:`step_eval_dir` (``checkpoint``: the run folder)."""
    return write_evaluation(step_eval_dir(run_dir, step), result, evaluator, str(run_dir), step=step)


def truncate_step_evals(run_dir: str | Path, start_step: int) -> None:
    """Remove the in-training evaluations of steps after ``start_step`` (a resumed run redoes them)."""
    folder = Path(run_dir) / EVAL_DIR
    for path in folder.glob(f"{STEP_PREFIX}*") if folder.is_dir() else []:
        suffix = path.name.removeprefix(STEP_PREFIX)
        if path.is_dir() and suffix.isdigit() and int(suffix) > start_step:
            shutil.rmtree(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def resolve_model_folder(checkpoint: str, marker: tuple[str, ...] = ("config.json", "adapter_config.json")) -> Path:
    """The model folder of ``checkpoint``: a run folder's ``model/``, or the folder itself when it
    holds one of ``marker`` (a save_pretrained or adapter folder). ConfigError otherwise. A folder
    with a checksum manifest (an mmpo ``model/``) is verified first: CheckpointError when damaged."""
    path = Path(checkpoint).expanduser()
    for folder in (path / "model", path):
        if any((folder / m).exists() for m in marker):
            verify_model_folder(folder)
            return folder
    raise ConfigError(
        f"checkpoint='{checkpoint}' is neither a model folder (with {' or '.join(marker)}) nor a run folder with a "
        "model/ inside."
    )


def default_eval_dir(checkpoint: str | None, run_dir: Path) -> Path:
    """Where ``mmpo eval`` writes when no ``output_dir=`` is given: next to the checkpoint
    (``<run>/eval`` for a run folder, ``<parent>/eval_<name>`` for a model folder), or
    ``<run_dir>/eval_base`` for the config's untrained model.

    In a run folder, ``mmpo eval`` writes files at the top of ``eval/`` (``metrics.json``,
    ``predictions.jsonl``, ``media/``, pictures) and training writes folders
    ``eval/step_<8-digit step>/``: no name is both, so neither overwrites the other."""
    if not checkpoint or checkpoint.startswith("tiny:"):
        return Path(run_dir) / "eval_base"
    path = Path(checkpoint).expanduser()
    if (path / "model").is_dir():
        return path / EVAL_DIR
    return path.parent / f"eval_{path.name}"


def eval_ranks() -> tuple[int, int, Callable[[Any], list[Any]]]:
    """``(rank, world_size, gather)`` of an evaluation launched by torchrun (the process group is
    created on first use, gloo on the CPU, nccl on CUDA); ``(0, 1, [x])`` in one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, lambda x: [x]
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    return dist.get_rank(), dist.get_world_size(), gather


__all__ = [
    "EvalResult",
    "Evaluator",
    "default_eval_dir",
    "eval_ranks",
    "image_references",
    "resolve_model_folder",
    "run_evaluation",
    "step_eval_dir",
    "truncate_step_evals",
    "write_evaluation",
    "write_step_evaluation",
]
