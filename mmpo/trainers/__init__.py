"""Trainers: the loop every trainer shares (:mod:`~mmpo.trainers.loop`), the one update routine
(:mod:`~mmpo.trainers.update`), the one algorithm builder (:mod:`~mmpo.trainers.algorithm`), and
one trainer per kind of action unit (:mod:`~mmpo.trainers.kinds`):

- :mod:`~mmpo.trainers.token`: generated tokens (text, VLM, agent turns; HCPO's two branches);
- denoising steps (Flow-GRPO, Chunk-GRPO) and initial noise (FIND);
- environment actions (RIPT-VLA, MiniWoB GRPO, ScreenExplorer);
- forecast steps (air-quality forecasting).

Submodules are imported on use, so importing this package loads no model code.
"""


def trainer_class_for(task_name: str) -> type:
    """The trainer class that runs task ``task_name`` (``Task.trainer_class()``; None: the token trainer)."""
    from mmpo.tasks import get_task_class

    cls = get_task_class(task_name).trainer_class()
    if cls is None:
        from mmpo.trainers.token import Trainer

        cls = Trainer
    return cls


def run_kind(run_dir: str) -> "str | None":
    """The trainer kind (``token``, ``denoising``, ...) of a run folder's task, read from its
    ``config.yaml``; None when the folder has no readable config or its task is not installed here."""
    from pathlib import Path

    import yaml

    try:
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
        return trainer_class_for(str(config["task"]["name"])).kind.name
    except Exception:  # a run of another install or an unreadable config: the caller goes on without the kind
        return None


__all__ = ["trainer_class_for", "run_kind"]
