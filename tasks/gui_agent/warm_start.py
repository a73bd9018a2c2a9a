"""Supervised warm start of a GUI agent on its episode data, before HCPO.

A random (tiny) VLM never writes ``<action>click(x, y)</action>`` by chance. This fits the model to
the reference action of every training step (the prompt with the full history, as the task builds
it; target ``<action>...</action>``) with ``mmpo.sft`` and saves a save_pretrained folder for
``mmpo train configs/hiconagent.yaml model.path=<out> 'model.tiny={}'``. The recipe itself runs the
same fit as its stage 1 (``task.warm_start.enabled: true``, see ``hicon_trainer.py``), so this
command is only needed for a model folder of its own.

    python -m mmpo_tasks.gui_agent.warm_start configs/hiconagent.yaml --out runs/hicon_warm [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mmpo.errors import MMPOError
from mmpo.sft import (
    CompletionExample,
    SFTConfig,
    completion_examples,
    completion_nll,
    save_warm_start,
    supervised_train,
    warm_start_setup,
)

DESC = "warm start (GUI steps)"


def target_text(action: Any) -> str:
    """The completion the model is fitted to for a reference action."""
    return f"<action>{action.to_text()}</action>"


def reference_examples(task: Any, policy: Any) -> list[CompletionExample]:
    """Every training step of the task (its prompt with the full history) and its reference action."""
    samples = [task.train_sample(i) for i in range(task.num_train())]
    return completion_examples(policy, [s.messages for s in samples], [target_text(s.meta["action"]) for s in samples])


def fit_reference_actions(task: Any, policy: Any, model: Any, sft: SFTConfig, seed: int) -> dict[str, Any]:
    """Fit ``model`` (wrapped by ``policy``) in place to :func:`reference_examples`; returns the
    :func:`mmpo.sft.supervised_train` result with ``examples`` (their count)."""
    examples = reference_examples(task, policy)
    result = supervised_train(model, examples, lambda batch: completion_nll(policy, batch), sft, seed=seed, desc=DESC)
    result.update(examples=len(examples))
    return result


def warm_start(cfg: Any, out: str, sft: SFTConfig) -> dict[str, Any]:
    """The CLI: fit ``model.path`` of the recipe ``cfg`` and save it to ``out`` (a save_pretrained folder)."""
    task, model, processor, policy = warm_start_setup(cfg)
    result = fit_reference_actions(task, policy, model, sft, cfg.seed)
    save_warm_start(model, processor, out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    from mmpo.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the HiconAgent recipe (its task and model.path)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        res = warm_start(cfg, a.out, SFTConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr))
    except MMPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {res['examples']} GUI steps, loss {res['loss_first_epoch']:.3f} -> {res['loss_last_epoch']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
