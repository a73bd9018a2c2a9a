"""The one evaluator: held-out evaluation of a policy, during training and for ``mmpo eval``.

Each trainer kind supplies an :class:`Evaluator` (its held-out items, how its policy predicts
them, how predictions become metrics); this module shards the items over ranks, gathers the rows
and writes one layout:

- ``predictions.jsonl``: one JSON object per held-out item, ``{"id", "input", "prediction",
  "answer", <score>: float, ...}`` (``input``: the question, prompt, instruction or start time;
  ``prediction``: the completion, image reference, actions or forecast; ``answer``: the reference
  when there is one; then each score component of the item; keys starting with ``_`` travel
  with the gathered rows for the metrics but are not written);
- ``metrics.json``: the metrics over all items, with ``checkpoint`` (what was evaluated);
- the kind's pictures (image grids, episode GIFs, forecast plots) beside them.

``mmpo eval`` builds the evaluator from a checkpoint without an optimizer or a training engine
(``Trainer.checkpoint_evaluator``) and by default writes next to the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from mmpo.checkpoint import save_json
from mmpo.errors import ConfigError


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
) -> EvalResult:
    """Each rank predicts its contiguous share of the items; the rows are gathered in item order.
    A rank without items predicts the first one and drops it: every rank makes the same
    collective calls (generation under ZeRO-3 gathers parameters)."""
    items = evaluator.items()
    per_rank = math.ceil(len(items) / world_size) if items else 0
    first = rank * per_rank
    mine = items[first : first + per_rank]
    rows = evaluator.predict(mine or items[:1], first if mine else 0)[: len(mine)] if items else []
    all_rows = [r for part in gather(rows) for r in part]
    metrics = evaluator.summarize(items[: len(all_rows)], all_rows) if all_rows else {}
    return EvalResult(items[: len(all_rows)], all_rows, metrics)


def write_evaluation(out_dir: Path, result: EvalResult, evaluator: Evaluator, checkpoint: str) -> dict[str, Any]:
    """Write ``predictions.jsonl`` (atomically), ``metrics.json`` and the evaluator's pictures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / "predictions.jsonl"
    tmp = pred_path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for row in result.rows:  # keys starting with "_" travel with the rows but are not written
            f.write(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, default=_jsonable) + "\n")
    tmp.replace(pred_path)
    artifacts = evaluator.write_artifacts(out_dir, result.items, result.rows)
    save_json(out_dir / "metrics.json", {"checkpoint": checkpoint, **result.metrics})
    return {"metrics": result.metrics, "predictions": str(pred_path), **artifacts}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def resolve_model_folder(checkpoint: str, marker: tuple[str, ...] = ("config.json", "adapter_config.json")) -> Path:
    """The model folder of ``checkpoint``: a run folder's ``model/``, or the folder itself when it
    holds one of ``marker`` (a save_pretrained or adapter folder). ConfigError otherwise."""
    path = Path(checkpoint).expanduser()
    for folder in (path / "model", path):
        if any((folder / m).exists() for m in marker):
            return folder
    raise ConfigError(
        f"checkpoint='{checkpoint}' is neither a model folder (with {' or '.join(marker)}) nor a run folder with a "
        "model/ inside."
    )


def default_eval_dir(checkpoint: str | None, run_dir: Path) -> Path:
    """Where ``mmpo eval`` writes when no ``output_dir=`` is given: next to the checkpoint
    (``<run>/eval`` for a run folder, ``<parent>/eval_<name>`` for a model folder), or
    ``<run_dir>/eval_base`` for the config's untrained model."""
    if not checkpoint or checkpoint.startswith("tiny:"):
        return Path(run_dir) / "eval_base"
    path = Path(checkpoint).expanduser()
    if (path / "model").is_dir():
        return path / "eval"
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
    "resolve_model_folder",
    "run_evaluation",
    "write_evaluation",
]
