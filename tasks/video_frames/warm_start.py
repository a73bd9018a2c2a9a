"""Cold start of FrameMind on scripted expert trajectories, before DRFS-GRPO.

A random (tiny) VLM never writes a tool call by chance. This writes expert conversations for the
training rows - with probability ``tool_fraction`` the expert calls ``video_clip`` over the whole
clip (the observation is the real tool output) and then answers; otherwise it answers at once -
starting from each DRFS setting in turn, and fits the model to the expert's tokens only
(``mmpo.sft``; observation tokens are masked). The model is saved as a save_pretrained folder
for ``mmpo train ... model.path=<out>``.

    python -m mmpo_tasks.video_frames.warm_start configs/framemind.yaml --out runs/framemind_warm [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

from mmpo.errors import MMPOError
from mmpo.rollout.agent_loop import AgentLoop, AgentSettings, AgentTrajectory, score_trajectories
from mmpo.sft import SFTConfig, save_warm_start, supervised_train, warm_start_setup


def expert_script(row: dict[str, Any], answer: str, use_tool: bool, num_frames: int) -> list[str]:
    """The expert's turn texts for one row."""
    final = f"<answer>{answer}</answer>"
    if not use_tool:
        return [final]
    call = {
        "name": "video_clip",
        "arguments": {"start_s": 0, "end_s": round(float(row["duration_s"]), 2), "num_frames": num_frames},
    }
    return [f"<tool_call>{json.dumps(call)}</tool_call>", final]


def expert_trajectories(
    task: Any,
    policy: Any,
    model: torch.nn.Module,
    *,
    examples: int,
    tool_fraction: float,
    seed: int,
    batch_size: int = 16,
) -> list[AgentTrajectory]:
    """``examples`` expert conversations over the training rows (cycling; the k-th from DRFS setting k)."""
    from mmpo.rollout.engines.forced import ForcedTextEngine

    rng = np.random.default_rng(seed)
    n_frames = min(8, task.config.max_clip_frames)
    out: list[AgentTrajectory] = []
    for s in range(0, examples, batch_size):
        idx = list(range(s, min(s + batch_size, examples)))
        samples = [task.train_sample(i % task.num_train()) for i in idx]
        tools = rng.random(len(idx)) < tool_fraction
        scripts = [expert_script(x.meta["row"], x.answer, bool(t), n_frames) for x, t in zip(samples, tools)]
        loop = AgentLoop(
            policy, ForcedTextEngine(policy, scripts), task.tools(), AgentSettings(**task.agent_settings())
        )
        encodings = [policy.encode(task.rollout_messages(x, i)) for x, i in zip(samples, idx)]
        out.extend(loop.run(model, encodings, [task.tool_context(x) for x in samples], device=torch.device("cpu")))
    return out


def warm_start(cfg: Any, out: str, *, examples: int, tool_fraction: float, sft: SFTConfig) -> dict[str, Any]:
    task, model, processor, policy = warm_start_setup(cfg)
    trajs = expert_trajectories(task, policy, model, examples=examples, tool_fraction=tool_fraction, seed=cfg.seed)
    bad = [t for t in trajs if t.tool_errors or t.malformed_calls or t.answer is None]
    if bad:
        raise MMPOError(f"{len(bad)} expert trajectories failed (first: {bad[0].observations[:1]})")

    def loss_fn(batch: list[AgentTrajectory]) -> torch.Tensor:
        logp, mask = score_trajectories(policy, batch)
        return -(logp * mask).sum() / mask.sum()

    result = supervised_train(model, trajs, loss_fn, sft, seed=cfg.seed, desc="warm start (expert trajectories)")
    result.update(examples=len(trajs), tool_fraction=float(np.mean([t.tool_calls > 0 for t in trajs])))
    save_warm_start(model, processor, out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    from mmpo.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the FrameMind recipe (its task and model.path)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--examples", type=int, default=256, help="expert conversations (default 256)")
    p.add_argument(
        "--tool-fraction", type=float, default=0.35, help="share of conversations that call video_clip (default 0.35)"
    )
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        res = warm_start(
            cfg,
            a.out,
            examples=a.examples,
            tool_fraction=a.tool_fraction,
            sft=SFTConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr),
        )
    except MMPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{a.out}: {res['examples']} expert conversations ({res['tool_fraction']:.0%} with a tool call), "
        f"loss {res['loss_first_epoch']:.3f} -> {res['loss_last_epoch']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
