"""Padding-free (packed) log-prob passes equal the padded forward (docs/performance.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpo.errors import ConfigError
from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.policies.packing import check_padding_free, pack_bins
from mmpo.tasks import build_task


def _policy(kind: str, padding_free: bool, **model_kw) -> CausalLMPolicy:
    model, proc, info = load_model(f"tiny:{kind}", seed=0, **model_kw)
    return CausalLMPolicy.from_info(model, proc, info, padding_free=padding_free)


def _prompts(pol: CausalLMPolicy, n: int) -> list[dict]:
    task = build_task("synthetic_vqa", {"num_train": 32}, seed=3)
    samples = [task.train_sample(i) for i in range(n)]
    if not pol.is_vlm:  # prompts of very different lengths
        for i, s in enumerate(samples):
            s.messages = [{"role": "user", "content": "word " * (1 + 9 * i) + "answer?"}]
    return [pol.encode(s.messages) for s in samples]


def _batch(pol: CausalLMPolicy, seed: int = 0):
    """8 rows after 3 prompts, completion lengths 130, 1, 0 (masked row), 17, 2, 23, 9, 5 of 130: the
    long row makes room for several rows (and their images) in one packed row."""
    a, b, c = _prompts(pol, 3)
    encodings = [a, a, b, a, b, c, b, a]
    lengths = torch.tensor([130, 1, 0, 17, 2, 23, 9, 5])
    ids = torch.randint(5, 300, (len(encodings), 130), generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(130)[None, :] < lengths[:, None]
    return encodings, ids, mask


def _run(pol, encodings, ids, mask, share):
    pol.model.zero_grad(set_to_none=True)
    out = pol.score(encodings, ids, mask, share_prefix=share, topk=2)
    weights = torch.randn(out.logp.shape, generator=torch.Generator().manual_seed(7))
    loss = (out.logp * weights * mask).sum() + 0.3 * (out.entropy * mask).sum() + (out.topk_logp[..., 1] * mask).sum()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in pol.model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize(
    "kind,attn",
    [("qwen2", "sdpa"), ("qwen2_vl", "sdpa"), ("qwen2", "eager"), ("qwen3", "sdpa"), ("qwen2_5_vl", "sdpa")],
)
@pytest.mark.parametrize("share", [False, True])
def test_packed_equals_padded_values_and_gradients(kind, attn, share):
    torch.manual_seed(0)
    padded, packed = _policy(kind, False, attn_implementation=attn), _policy(kind, True, attn_implementation=attn)
    packed.model.load_state_dict(padded.model.state_dict())
    encodings, ids, mask = _batch(padded)
    p_out, p_grads = _run(padded, encodings, ids, mask, share)
    q_out, q_grads = _run(packed, encodings, ids, mask, share)
    for name in ("logp", "entropy", "topk_logp"):
        a, b = getattr(p_out, name).detach(), getattr(q_out, name).detach()
        assert (a[mask] - b[mask]).abs().max() < 1e-5, name
        assert (b[~mask] == 0).all(), name  # masked positions are 0, not garbage
    assert (p_out.is_top1[mask] == q_out.is_top1[mask]).all()
    assert p_grads.keys() == q_grads.keys() and len(p_grads) > 0
    if padded.is_vlm:  # image features are consumed in the right order: the vision tower's grads agree
        assert any(k.startswith("model.visual") for k in q_grads)
    for k in p_grads:
        assert (p_grads[k] - q_grads[k]).abs().max() < 1e-5, k


def _metrics(run) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("share", ["true", "false"])
def test_training_with_and_without_padding_free_gives_the_same_metrics(tmp_path, tiny_overrides, share):
    """Two quickstart steps (beta > 0: policy, reference and old-policy passes all pack) log the
    same metrics and end at the same weights as the padded passes."""
    from safetensors.torch import load_file

    from mmpo.cli import main

    quick = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    args = [
        "trainer.max_steps=2",
        "algorithm.kl_options={beta: 0.04}",
        "algorithm.dynamic_sampling=false",
        f"rollout.prefix_sharing={share}",
        *tiny_overrides,
        "rollout.max_new_tokens=6",
    ]
    runs = {}
    for packed in ("true", "false"):
        run = tmp_path / packed
        assert main(["train", quick, f"output_dir={run}", f"rollout.padding_free={packed}", *args]) == 0
        runs[packed] = (_metrics(run), load_file(str(run / "model" / "model.safetensors")))
    (m_on, w_on), (m_off, w_off) = runs["true"], runs["false"]
    assert len(m_on) == len(m_off) and [m["step"] for m in m_on][-2:] == [1, 2]
    compared = set()
    for a, b in zip(m_on, m_off):
        for k, v in b.items():
            if isinstance(v, float) and not any(s in k for s in ("time", "_s", "per_s", "mem")):
                assert a[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
                compared.add(k)
    assert {"entropy", "kl", "loss", "grad_norm", "ratio_mean"} <= compared, compared
    for k, v in w_off.items():
        assert (v - w_on[k]).abs().max() < 1e-4, k


def test_pack_bins_first_fit_decreasing_by_key_and_in_order():
    lengths = [5, 3, 0, 4, 2, 1]
    assert pack_bins(lengths, 5) == [[0], [3, 5], [1, 4]]  # 15 tokens in 3 bins of 5; the empty row left out
    assert pack_bins(lengths, 5, keys=[0, 1, 0, 1, 0, 1]) == [[0], [3, 5], [1], [4]]  # keys never share a bin
    assert pack_bins(lengths, 5, keep_order=True) == [[0], [1], [3], [4, 5]]  # next fit in row order


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_packed_pass_runs_fewer_tokens_through_the_decoder(kind):
    for share in (False, True):
        counts = []
        for padding_free in (False, True):
            pol = _policy(kind, padding_free)
            seen: list[int] = []
            pol.model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
            encodings, ids, mask = _batch(pol)
            with torch.no_grad():
                pol.score(encodings, ids, mask, share_prefix=share)
            counts.append(sum(seen))
        assert counts[1] < 0.8 * counts[0], (share, counts)


def test_padding_free_is_refused_where_it_is_not_verified():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmpo.config import RunConfig, load_config
    from mmpo.trainers.token_methods import check_token_methods

    quick = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    task = build_task("synthetic_vqa", {"num_train": 8}, seed=0)
    for attn in ("flash_attention_2", "flex_attention"):
        cfg = load_config(quick, ["rollout.padding_free=true", f"model.attn_implementation={attn}"], RunConfig)
        with pytest.raises(ConfigError, match="attn_implementation"):
            check_token_methods(cfg, task)
    accepted = load_config(quick, ["rollout.padding_free=true"], RunConfig)
    check_token_methods(accepted, task)  # sdpa, single-turn
    with pytest.raises(ConfigError, match="multi-turn"):
        check_padding_free(accepted, multi_turn=True)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    proc = _policy("qwen2", False).processor
    with pytest.raises(ConfigError, match="'llama'"):
        CausalLMPolicy(
            llama, proc, is_vlm=False, never_sample_ids=[], eos_token_ids=[1], pad_token_id=0, padding_free=True
        )


def test_bench_packing_reports_padded_and_packed_per_setting(capsys):
    import json

    from mmpo.cli import main

    args = ["bench", "--packing", "--rows", "6", "--group-size", "3", "--max-new-tokens", "24", "--steps", "1"]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["rows"], r["prefix_sharing"]) for r in rows] == [(6, False), (6, True)]
    for r in rows:
        assert r["packed_decoder_tokens"] < r["padded_decoder_tokens"]
        assert 0 <= r["packed_padding_pct"] < r["padded_padding_pct"]
        assert r["max_abs_dlogp"] < 1e-5
        assert r["ref_pass_speedup"] == pytest.approx(r["padded_ref_pass_s"] / r["packed_ref_pass_s"], rel=0.02)
