"""What fits: device memory, the settings search, the table of ``mmpo bench --estimate`` and the
warning of ``mmpo train`` (the estimate itself: :mod:`mmpo.memory_estimate`)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from mmpo.memory_estimate import GiB, MemoryEstimate, estimate_memory


def device_memory(device: str) -> int:
    """Bytes the run may use: CUDA device 0's total memory, else the available system RAM."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    import psutil

    return int(psutil.virtual_memory().available)


def _zero_file(stage: int, offload: bool) -> str:
    """A DeepSpeed JSON for ``stage`` (the repository's configs/deepspeed file, or a temporary one
    with optimizer offload)."""
    repo = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / f"zero{stage}.json"
    if not offload and repo.is_file():
        return str(repo)
    fd, path = tempfile.mkstemp(prefix=f"mmpo-zero{stage}-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        fh.write(
            '{"zero_optimization": {"stage": %d%s}}'
            % (stage, ', "offload_optimizer": {"device": "cpu"}' if offload else "")
        )
    return path


def candidates(cfg: Any) -> list[tuple[list[str], Any]]:
    """Settings to try, cheapest change first: micro batch halvings, then + checkpointing, then ZeRO
    2 / 3 (+ optimizer offload), each as ``(overrides, config)``."""
    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    mb = cfg.trainer.micro_batch_size or cfg.trainer.minibatch_size or rows
    micro = []
    while mb >= 1:
        micro.append(mb)
        if mb == 1:
            break
        mb = max(1, mb // 2)
    out: list[tuple[list[str], Any]] = []
    zeros: list[tuple[list[str], str | None]] = [([], cfg.deepspeed)]
    for stage, off in ((2, False), (3, False), (3, True)):
        zeros.append(
            ([f"deepspeed=configs/deepspeed/zero{stage}.json" + (" + optimizer offload" if off else "")], None)
        )
    for zi, (zname, _) in enumerate(zeros):
        for ckpt in [False, True] if not cfg.model.gradient_checkpointing else [True]:
            for n in micro:
                over = []
                if n != (cfg.trainer.micro_batch_size or 0):
                    over.append(f"trainer.micro_batch_size={n}")
                if ckpt and not cfg.model.gradient_checkpointing:
                    over.append("model.gradient_checkpointing=true")
                over += zname
                trainer = dataclasses.replace(cfg.trainer, micro_batch_size=n)
                model = dataclasses.replace(cfg.model, gradient_checkpointing=ckpt)
                c = dataclasses.replace(cfg, trainer=trainer, model=model)
                if zi > 0:
                    stage, off = ((2, False), (3, False), (3, True))[zi - 1]
                    c = dataclasses.replace(c, deepspeed=_zero_file(stage, off))
                out.append((over, c))
    return out


def first_fit(cfg: Any, capacity: int, **kw: Any) -> tuple[list[str], MemoryEstimate] | None:
    """The first candidate (see :func:`candidates`) whose estimated peak fits in ``capacity`` bytes."""
    for over, c in candidates(cfg):
        est = estimate_memory(c, **kw)
        if est.peak <= capacity:
            return over, est
    return None


def _gb(b: int) -> str:
    return f"{b / GiB:8.2f} GiB"


def format_table(est: MemoryEstimate, capacity: int, fit: tuple[list[str], MemoryEstimate] | None) -> str:
    """The readable report of ``mmpo bench --estimate``."""
    lines = [
        f"memory estimate ({est.device}, precision {est.precision}, {est.world_size} rank(s), "
        f"ZeRO stage {est.zero_stage}; {est.settings['params']:,} parameters, "
        f"{est.settings['trainable_params']:,} trainable)"
    ]
    lines += [f"  {n}" for n in est.notes]
    for p in est.phases:
        lines.append(f"{p.name:<44s} {_gb(p.total)}")
        for name, b in p.components.items():
            lines.append(f"    {name:<40s} {_gb(b)}")
    lines.append(f"{'peak (' + est.peak_phase + ')':<44s} {_gb(est.peak)}")
    lines.append(f"{'device memory':<44s} {_gb(capacity)}")
    if est.peak <= capacity:
        lines.append("fits.")
    elif fit is None:
        lines.append("does not fit, and no tried setting fits (micro batch, checkpointing, ZeRO 2/3 + offload).")
    else:
        lines.append(f"does not fit; this fits ({fit[1].peak / GiB:.1f} GiB): {' '.join(fit[0]) or '(as is)'}")
    return "\n".join(lines)


def train_warning(cfg: Any) -> str | None:
    """The ``warning:`` paragraph ``mmpo train`` prints when the estimate exceeds the device's memory
    (None when it fits); an estimate that fails gives a one-line ``warning: no memory estimate``."""
    try:
        est = estimate_memory(cfg)
        capacity = device_memory(est.device)
        if est.peak <= capacity:
            return None
        fit = first_fit(cfg, capacity, device=est.device)
    except Exception as e:  # noqa: BLE001 - the estimate must never stop training
        return f"warning: no memory estimate ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    text = (
        f"the estimated peak memory of this run is {est.peak / GiB:.1f} GiB ({est.peak_phase} phase), more than "
        f"the {capacity / GiB:.1f} GiB of the {est.device} device; it may run out of memory. "
        + (
            f"Estimated to fit ({fit[1].peak / GiB:.1f} GiB): {' '.join(fit[0])}."
            if fit
            else "No tried setting fits (micro batch, gradient checkpointing, ZeRO 2/3 with offload)."
        )
        + " Details: mmpo bench --estimate CONFIG [key=value ...]."
    )
    return textwrap.fill("warning: " + text, width=100, break_long_words=False, break_on_hyphens=False)
