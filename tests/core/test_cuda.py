"""Every core entry gives the same result on CUDA tensors as on CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from helpers.fake_inputs import declared, fake_inputs

from mmpo.core import (
    ADVANTAGES,
    AGGREGATIONS,
    GROUP_FILTERS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    GroupBatchFiller,
    aggregate,
    chunk_log_ratio,
    entropy,
    kl_to_reward,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert b.device.type == "cuda", "result left the GPU"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)
    elif isinstance(a, (tuple, list)):
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def _batch(seed=0, n=8, t=6):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (n,), generator=g).float() + 0.1 * torch.rand(n, generator=g)
    ids = torch.tensor([13, 2, 13, 2, 7, 7, 13, 2])[:n]
    logp = -torch.rand(n, t, generator=g) * 2
    old = logp + 0.3 * torch.randn(n, t, generator=g)
    mask = torch.rand(n, t, generator=g) > 0.2
    mask[:, 0] = True
    return rewards, ids, logp, old, mask


def _inputs(fn, opts, rewards, logp, mask) -> dict:
    return fake_inputs(declared(fn, opts), rewards, logp, mask)


def _to(d: dict, dev) -> dict:
    return {k: v.to(dev) for k, v in d.items()}


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_advantages(name):
    rewards, ids, *_ = _batch()
    fn = ADVANTAGES.get(name)
    opts = {}
    if name == "bnpo":
        opts = dict(min_value=0.0, max_value=1.1)
    rewards = rewards.clamp(0, 1) if name == "bnpo" else rewards
    _, _, logp, _, mask = _batch()
    extra = _inputs(fn, opts, rewards, logp, mask)
    cls = getattr(fn, "state_cls", None)
    out_cpu = fn(rewards, ids, **opts, **extra, **({"state": cls()} if cls else {}))
    out_gpu = fn(rewards.to(CUDA), ids.to(CUDA), **opts, **_to(extra, CUDA), **({"state": cls()} if cls else {}))
    _same(out_cpu, out_gpu)


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_losses_and_aggregation(name):
    rewards, ids, logp, old, mask = _batch()
    adv = ADVANTAGES.get("grpo")(rewards, ids)
    results = []
    fn = POLICY_LOSSES.get(name)
    extra = _inputs(fn, {}, rewards, logp, mask)
    for dev in ("cpu", CUDA):
        lp = logp.to(dev).requires_grad_(True)
        loss, metrics = fn(lp, old.to(dev), adv.to(dev), mask.to(dev), **_to(extra, dev))
        aggs = [aggregate(loss, mask.to(dev), m) for m in AGGREGATIONS.names()]
        (grad,) = torch.autograd.grad(aggs[0], lp)
        results.append((loss.detach(), metrics, [a.detach() for a in aggs], grad))
    for a, b in zip(*results):
        _same(a, b)


def test_kl_entropy_filters_and_helpers():
    rewards, ids, logp, old, mask = _batch()
    for name in KL_ESTIMATORS.names():
        fn = KL_ESTIMATORS.get(name)
        if name == "gaussian":
            m, r = torch.randn(8, 6, 3), torch.randn(8, 6, 3)
            _same(fn(m, r, 0.7), fn(m.to(CUDA), r.to(CUDA), torch.tensor(0.7, device=CUDA)))
        else:
            _same(fn(logp, old), fn(logp.to(CUDA), old.to(CUDA)))
    kl = KL_ESTIMATORS.get("k3")(logp, old)
    _same(kl_to_reward(rewards, kl, mask, 0.1), kl_to_reward(rewards.to(CUDA), kl.to(CUDA), mask.to(CUDA), 0.1))
    _same(chunk_log_ratio(logp, [1, 2, 3]), chunk_log_ratio(logp.to(CUDA), [1, 2, 3]))
    logits = torch.randn(4, 5, 50) * 5
    _same(entropy.token_entropy(logits), entropy.token_entropy(logits.to(CUDA)))
    top = torch.log_softmax(logits, -1).topk(10).values
    _same(entropy.topk_entropy(top), entropy.topk_entropy(top.to(CUDA)))
    H = torch.rand(8, 6)
    _same(entropy.window_entropy(H, mask), entropy.window_entropy(H.to(CUDA), mask.to(CUDA)))

    adv = ADVANTAGES.get("grpo")(rewards, ids)
    f = GROUP_FILTERS.get
    cases = [
        ("dynamic", (rewards.round(), ids), {}),
        ("dynamic", (rewards, ids), dict(lo=0.2, hi=0.9)),
        ("overlong_filter", (mask,), dict(truncated=torch.tensor([0, 1, 0, 0, 1, 0, 0, 0]).bool())),
        ("soft_overlong_punishment", (torch.arange(8) * 3,), dict(max_len=20, cache_len=8)),
        ("cppo_prune", (adv, ids), dict(prune_ratio=0.5)),
        ("lspo", (mask.sum(-1), ids), {}),
        ("d3s", (adv, H, mask), dict(progress=0.3)),
    ]
    for name, args, kw in cases:
        gpu_args = tuple(a.to(CUDA) for a in args)
        gpu_kw = {k: (v.to(CUDA) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        _same(f(name)(*args, **kw), f(name)(*gpu_args, **gpu_kw))

    filler = GroupBatchFiller(target_groups=2, max_draws=2)
    part = {"group_ids": ids.to(CUDA), "reward": rewards.to(CUDA)}
    filler.add(part, GROUP_FILTERS.get("dynamic")(part["reward"], part["group_ids"]))
    out = filler.result()
    assert out["reward"].device.type == "cuda" and out["group_ids"].device.type == "cuda"
