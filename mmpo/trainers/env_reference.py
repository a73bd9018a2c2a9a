"""The environment trainer's reference policy (kept out of ``environment.py``, which stays short).

With a KL term on (``algorithm.kl_options.beta > 0`` or a KL schedule), the environment trainer
holds a frozen copy of the policy it starts RL from (the loaded model, or the supervised stage's
result; a checkpoint loaded later moves only the trained policy) and scores the reference's
log-probs of the taken action units in every micro batch. The one update routine
(:func:`mmpo.trainers.update.compose_loss`) then adds ``beta * KL`` with the configured sample
estimator (``k3`` by default, as ScreenExplorer, arXiv 2505.19095: k3, beta 0.04; see
``docs/algorithms.md``, KL estimators).

The environment trainer trains the full VLM (``model.lora`` is refused: new action-token rows need
full embeddings), so the reference is always a copy, never the policy with adapters disabled.

Sample estimators on log-*density* differences (a continuous Laplace head, ``densities``) are
valid too: for actions ``a ~ pi``, ``E[log pi(a) - log ref(a)] = KL(pi || ref)`` and
``E[ref(a) / pi(a)] = 1`` hold for densities as for probabilities, so k1 is unbiased and k3 is
unbiased and non-negative there; with a factorised head the per-dimension terms add up to the
KL of the joint action.
"""

from __future__ import annotations

import copy
import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn


def zero_stage(path: str) -> int:
    """The ZeRO stage a DeepSpeed JSON file asks for (0 when it cannot be read: the engine reports that)."""
    try:
        stage = json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0)
        return int(stage)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def frozen_reference(module: nn.Module, enabled: bool) -> nn.Module | None:
    """A frozen copy of ``module`` (eval mode, no grad; same device and dtype) when ``enabled``, else None.

    Call it with the engine's module before a checkpoint is loaded, so the copy is the start policy
    (under DeepSpeed bf16 the copy is in the engine's dtype, like the policy it is compared with)."""
    if not enabled:
        return None
    return copy.deepcopy(module).eval().requires_grad_(False)


def reference_logp(
    policy: Any,
    reference: nn.Module | None,
    encodings: Sequence[Any],
    units: torch.Tensor,
    mask: torch.Tensor,
    autocast: AbstractContextManager[Any],
    device: torch.device,
) -> torch.Tensor | None:
    """``logp_ref [S, U]`` float32 on ``device``: the reference's log-probs of the taken action
    ``units [S, U]`` (``mask [S, U]``) at the steps' model inputs, without grad; None without a reference."""
    if reference is None:
        return None
    with torch.no_grad(), autocast:
        logp = policy.log_probs(list(encodings), units, mask, model=reference)
    return logp.float().to(device)


__all__ = ["frozen_reference", "reference_logp", "zero_stage"]
