"""A few engine steps on a toy MLP; run under torchrun by tests/test_engine_distributed.py.

Each rank writes ``OUT/rank{R}.json`` (atomically, as its last act): the step results and its
full parameters after training (gathered under ZeRO-3). Rank 0 also writes the final weights with
``save_pretrained`` to ``OUT/pretrained``. The same functions build the single-process reference
inside the test.

Data: step ``s`` has one global batch of ``world * accum * micro`` rows drawn from seed ``s``;
rank ``r`` takes micro batch ``k`` from rows ``(r * accum + k) * micro`` on. Each micro loss is
its MSE mean divided by ``accum``, so the rank-averaged gradient is the global-batch mean.

    python toy_engine_script.py --out DIR [--deepspeed CFG] [--steps 6] [--accum 2] [--micro 2]
        [--save-at K --ckpt DIR] [--resume DIR] [--poison-grad S:R] [--nan-loss S:R]
        [--device cpu|cuda] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from mmpo.engine import Engine, EngineOptions, StepResult

D_IN, HIDDEN = 16, 64


class NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with non-finite grads)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return torch.full_like(g, float("nan"))


class ToyMLP(nn.Module):
    """x [B, 16] -> y [B, 1]; matrices of 1024 and 4096 elements (sharded by zero3.json)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, HIDDEN)
        self.hid = nn.Linear(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, 1)

    def forward(self, x: Tensor, poison: bool = False) -> Tensor:
        h = torch.tanh(self.inp(x))
        if poison:
            h = NanGrad.apply(h)
        return self.out(torch.tanh(self.hid(h)))


def make_model() -> ToyMLP:
    torch.manual_seed(0)
    return ToyMLP()


def global_batch(step: int, rows: int) -> tuple[Tensor, Tensor]:
    """x [rows, 16], y [rows, 1] for one step, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(rows, D_IN, generator=g)
    y = torch.sin(x[:, :4].sum(-1, keepdim=True))
    return x, y


def parse_at(text: str | None) -> tuple[int, int] | None:
    """'S:R' -> (step, rank); rank -1 means every rank."""
    if not text:
        return None
    s, r = text.split(":")
    return int(s), int(r)


def train(
    engine: Engine,
    start: int,
    stop: int,
    accum: int,
    micro: int,
    poison_grad: tuple[int, int] | None = None,
    nan_loss: tuple[int, int] | None = None,
    save_at: int | None = None,
    ckpt: Path | None = None,
) -> list[StepResult]:
    """Steps ``start .. stop-1``; saves to ``ckpt`` after ``save_at`` steps are done."""
    rank, world = engine.rank, engine.world_size
    results = []
    for step in range(start, stop):
        x, y = global_batch(step, world * accum * micro)
        for k in range(accum):
            lo = (rank * accum + k) * micro
            xb, yb = x[lo : lo + micro].to(engine.device), y[lo : lo + micro].to(engine.device)
            xb = xb.to(next(engine.module.parameters()).dtype)  # bf16 under DeepSpeed bf16

            def hit(at, step=step, k=k):
                return at is not None and at[0] == step and at[1] in (rank, -1) and k == 0

            with engine.autocast():
                pred = engine.forward_module()(xb, poison=hit(poison_grad))
            loss = ((pred.float() - yb) ** 2).mean() / accum
            if hit(nan_loss):
                loss = loss * float("nan")
            engine.backward(loss)
        results.append(engine.step())
        if save_at is not None and step + 1 == save_at:
            assert ckpt is not None
            engine.save(ckpt)
    return results


def full_params(engine: Engine) -> dict[str, list]:
    """Every parameter, whole, as nested lists (exact: float32 -> float -> JSON round-trips)."""
    with engine.gathered_params():
        return {n: p.detach().float().cpu().tolist() for n, p in engine.module.named_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--deepspeed", default=None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--save-at", type=int, default=None)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--resume", type=Path, default=None)
    ap.add_argument("--poison-grad", default=None)
    ap.add_argument("--nan-loss", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()

    opts = EngineOptions(
        lr=1e-2,
        lr_schedule="linear",
        warmup_steps=1,
        total_steps=args.steps,
        max_grad_norm=1.0,
        weight_decay=0.01,
        grad_accum_steps=args.accum,
        micro_batch_size=args.micro,
        device=args.device,
        precision=args.precision,
        deepspeed_config=args.deepspeed,
    )
    engine = Engine.build(make_model(), opts)
    init = full_params(engine)
    start = 0
    if args.resume is not None:
        engine.load(args.resume)
        start = args.save_at or 0
    results = train(
        engine,
        start,
        args.steps,
        args.accum,
        args.micro,
        poison_grad=parse_at(args.poison_grad),
        nan_loss=parse_at(args.nan_loss),
        save_at=args.save_at if args.resume is None else None,
        ckpt=args.ckpt,
    )
    params = full_params(engine)
    engine.save_pretrained(args.out / "pretrained")
    r = engine.rank
    collectives = {
        "mean_of_rank": engine.all_reduce_mean(float(r)),
        "gathered": engine.all_gather_object({"rank": r}),
        "finite_everywhere": engine.check_loss(torch.tensor(1.0)),
        "nan_on_rank0": engine.check_loss(torch.tensor(float("nan") if r == 0 else 1.0)),
    }
    record = {
        "rank": r,
        "world_size": engine.world_size,
        "collectives": collectives,
        "results": [[r.grad_norm, r.skipped, r.lr] for r in results],
        "init": init,
        "params": params,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f".rank{engine.rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, args.out / f"rank{engine.rank}.json")
    engine.barrier()
    engine.close()


if __name__ == "__main__":
    main()
