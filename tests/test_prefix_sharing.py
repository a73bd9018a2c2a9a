"""Prefix Grouper: one prefix pass per group gives the plain forward's values and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpo.cli import main
from mmpo.models import load_model, mark_checkpointed_layers
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def _policy(kind: str) -> CausalLMPolicy:
    model, proc, info = load_model(f"tiny:{kind}", seed=0)
    return CausalLMPolicy.from_info(model, proc, info)


def _prompt_encodings(pol: CausalLMPolicy, n: int) -> list[dict]:
    task = build_task("synthetic_vqa", {"num_train": 32}, seed=3)
    samples = [task.train_sample(i) for i in range(n)]
    if not pol.is_vlm:  # prompts of different lengths, so the prefix batch is left-padded
        for i, s in enumerate(samples):
            s.messages = [{"role": "user", "content": "word " * (2 + 5 * i) + "answer?"}]
    return [pol.encode(s.messages) for s in samples]


def _scores_and_grads(pol, encodings, ids, mask, share):
    pol.model.zero_grad(set_to_none=True)
    out = pol.score(encodings, ids, mask, share_prefix=share)
    weights = torch.randn(out.logp.shape, generator=torch.Generator().manual_seed(7))
    ((out.logp * weights * mask).sum() + 0.3 * (out.entropy * mask).sum()).backward()
    grads = {k: p.grad.clone() for k, p in pol.model.named_parameters() if p.grad is not None}
    return out.logp.detach(), out.entropy.detach(), grads


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
@pytest.mark.parametrize("width", [1, 6])
def test_shared_prefix_equals_plain_forward_values_and_gradients(kind, width):
    torch.manual_seed(0)
    pol = _policy(kind)
    a, b, c = _prompt_encodings(pol, 3)
    # groups split and interleaved as a micro batch can hold them; c appears once
    encodings = [a, a, b, a, b, c, b, a]
    ids = torch.randint(5, 300, (len(encodings), width))
    mask = torch.ones_like(ids, dtype=torch.bool)
    if width > 1:
        mask[1, 2:] = False  # EOS early: right padding in the completion pass
        mask[4, 1:] = False
    plain = _scores_and_grads(pol, encodings, ids, mask, share=False)
    shared = _scores_and_grads(pol, encodings, ids, mask, share=True)
    assert (plain[0][mask] - shared[0][mask]).abs().max() < 1e-5
    assert (plain[1][mask] - shared[1][mask]).abs().max() < 1e-5
    assert plain[2].keys() == shared[2].keys() and len(plain[2]) > 0
    if pol.is_vlm:  # the prefix's gradient reaches the vision tower
        assert any(k.startswith("model.visual") for k in shared[2])
    for k in plain[2]:
        assert (plain[2][k] - shared[2][k]).abs().max() < 1e-5, k


def test_mrope_positions_continue_after_the_prompts_largest_position():
    """Image tokens share positions (M-RoPE), so the completion starts at max position + 1, not
    at the prompt length; scoring with plain 1-D positions would differ."""
    pol = _policy("qwen2_vl")
    enc = _prompt_encodings(pol, 1)[0]
    decoder, _ = pol._decoder_and_head(pol.model)
    pos, delta = pol._rope_index(decoder, pol.collate([enc]))
    P = enc["input_ids"].shape[1]
    assert int(delta) < 0 and int(pos.max()) + 1 == P + int(delta)

    ids = torch.randint(5, 300, (4, 5))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        right = pol.score([enc] * 4, ids, mask, share_prefix=True).logp
        plain = pol.score([enc] * 4, ids, mask, share_prefix=False).logp
        # the same pass with the completion placed at the prompt length instead
        shifted = _policy("qwen2_vl")
        rope = shifted._rope_index
        shifted._rope_index = lambda d, p: (rope(d, p)[0], torch.zeros_like(rope(d, p)[1]))
        wrong = shifted.score([enc] * 4, ids, mask, share_prefix=True).logp
    assert (right - plain).abs().max() < 1e-5
    assert (wrong - plain).abs().max() > 1e-4  # 50x the tolerance above


def test_reference_scoring_without_gradient_uses_the_shared_pass():
    pol = _policy("qwen2")
    ref = load_model("tiny:qwen2", seed=5)[0]
    a, b = _prompt_encodings(pol, 2)
    encodings = [a] * 4 + [b] * 4
    ids = torch.randint(5, 300, (8, 4))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        shared = pol.score(encodings, ids, mask, model=ref, share_prefix=True).logp
        plain = pol.score(encodings, ids, mask, model=ref, share_prefix=False).logp
        own = pol.score(encodings, ids, mask, share_prefix=True).logp
    assert (shared - plain).abs().max() < 1e-5
    assert (shared - own).abs().max() > 1e-3  # it really scored under the other weights


def test_gradient_checkpointing_is_active_in_eval_mode_and_falls_back_to_the_plain_pass():
    pol = _policy("qwen2")
    model = pol.model
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert not model.training
    assert mark_checkpointed_layers(model) == 2  # the two decoder layers
    assert not pol.prefix_sharing_possible()
    with torch.no_grad():
        assert pol.prefix_sharing_possible()  # no backward, no recompute: the cache is kept

    calls = []
    layer = model.model.layers[0]
    # a child's pre-hook: the recompute calls the layer's forward, not its hooks, and stops early
    handle = layer.mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    a, b = _prompt_encodings(pol, 2)
    ids = torch.randint(5, 300, (4, 3))
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = pol.score([a, a, b, b], ids, mask, share_prefix=True)
    forward_calls = len(calls)
    out.logp.sum().backward()
    handle.remove()
    assert forward_calls == 1 and len(calls) == 2  # recomputed in backward: checkpointing acts
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.slow
def test_training_with_and_without_prefix_sharing_gives_the_same_model(tmp_path, tiny_overrides):
    """Two steps of the quickstart recipe (beta > 0: policy, reference and update passes all go
    through the shared prefix) end at the same weights as the plain forward."""
    args = [
        "trainer.max_steps=2",
        "algorithm.kl_options={beta: 0.04}",
        "algorithm.dynamic_sampling=false",
        "trainer.lr=1e-3",
        *tiny_overrides,
    ]
    runs = {}
    for share in ("true", "false"):
        run = tmp_path / share
        assert main(["train", QUICK, f"output_dir={run}", f"rollout.prefix_sharing={share}", *args]) == 0
        runs[share] = load_file(str(run / "model" / "model.safetensors"))
    start = load_model("tiny:qwen2_vl", seed=0)[0].state_dict()
    moved = 0.0
    for k, v in runs["true"].items():
        assert (v - runs["false"][k]).abs().max() < 1e-4, k
        if k in start:
            moved = max(moved, float((v - start[k]).abs().max()))
    assert moved > 1e-4


def test_bench_prefix_sharing_reports_both_passes_per_group_size(capsys):
    import json

    assert (
        main(
            [
                "bench",
                "--prefix-sharing",
                "--image-size",
                "112",
                "--group-sizes",
                "2,4",
                "--max-new-tokens",
                "3",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert [r["G"] for r in rows] == [2, 4]
    for r in rows:
        assert r["image_tokens"] == (112 // 28) ** 2 and r["prompt_tokens"] > r["image_tokens"]
        for k in ("plain_ref_pass_s", "shared_ref_pass_s", "plain_policy_pass_s", "shared_policy_pass_s"):
            assert r[k] > 0
        assert r["ref_pass_speedup"] == pytest.approx(r["plain_ref_pass_s"] / r["shared_ref_pass_s"], rel=0.02)
