"""The KV-cache sampling loop: shared prefill per group, per-row early exit, exact log-probs."""

from __future__ import annotations

import pytest
import torch

from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.engines.hf import GenerationSettings, HFGenerateEngine
from mmpo.tasks import build_task

CPU = torch.device("cpu")


def _policy(kind: str) -> CausalLMPolicy:
    model, proc, info = load_model(f"tiny:{kind}", seed=0)
    return CausalLMPolicy.from_info(model, proc, info)


def _encodings(pol: CausalLMPolicy, n: int) -> list[dict]:
    task = build_task("synthetic_vqa", {"num_train": 16}, seed=2)
    samples = [task.train_sample(i) for i in range(n)]
    if not pol.is_vlm:
        for i, s in enumerate(samples):
            s.messages = [{"role": "user", "content": "tell " * (1 + 6 * i) + "me?"}]
    return [pol.encode(s.messages) for s in samples]


def _favour_eos(pol: CausalLMPolicy, bonus: float) -> None:
    """Raise the EOS logit so that completions end at varied lengths."""
    eos = pol.eos_token_ids[0]

    def hook(module, args, out):
        out = out.clone()
        out[..., eos] += bonus
        return out

    pol.model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_greedy_loop_equals_transformers_generate(kind):
    pol = _policy(kind)
    _favour_eos(pol, 4.0)
    inputs = pol.collate(_encodings(pol, 3))  # different prompt lengths: left padding
    settings = GenerationSettings(8, greedy=True)
    loop = HFGenerateEngine(pol).generate(pol.model, inputs, settings, device=CPU, num_samples=2)
    ref = HFGenerateEngine(pol, {"use_generate": True}).generate(pol.model, inputs, settings, device=CPU, num_samples=2)
    assert loop.completion_ids.shape[0] == 6
    width = max(loop.completion_ids.shape[1], ref.completion_ids.shape[1])
    pad = lambda x, v: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=v)  # noqa: E731
    assert torch.equal(pad(loop.completion_ids, pol.pad_token_id), pad(ref.completion_ids, pol.pad_token_id))
    assert torch.equal(pad(loop.mask, False), pad(ref.mask, False))
    assert torch.equal(loop.truncated, ref.truncated)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_sampled_logprobs_equal_the_trainers_recomputation(kind):
    torch.manual_seed(0)
    pol = _policy(kind)
    _favour_eos(pol, 3.5)
    encs = _encodings(pol, 2)
    G = 4
    gen = HFGenerateEngine(pol).generate(
        pol.model, pol.collate(encs), GenerationSettings(10, temperature=0.7), device=CPU, num_samples=G
    )
    lengths = gen.mask.sum(1)
    assert lengths.min() < lengths.max()  # rows finished at different steps (early exit exercised)
    assert (gen.completion_ids[~gen.mask] == pol.pad_token_id).all()
    assert not torch.isin(gen.completion_ids[gen.mask], torch.tensor(pol.never_sample_ids)).any()
    rows = [e for e in encs for _ in range(G)]
    with torch.no_grad():
        ref = pol.score(rows, gen.completion_ids, gen.mask, temperature=0.7, share_prefix=False).logp
    assert (ref - gen.logprobs)[gen.mask].abs().max() < 1e-5
    assert (gen.logprobs[~gen.mask] == 0).all()


def test_same_seed_same_samples_and_top_k_limits_the_support():
    pol = _policy("qwen2")
    inputs = pol.collate(_encodings(pol, 1))
    engine = HFGenerateEngine(pol)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(engine.generate(pol.model, inputs, GenerationSettings(5), device=CPU, num_samples=8).completion_ids)
    assert torch.equal(runs[0], runs[1])
    # top_k = 2: every first token is one of the two most likely ones
    with torch.no_grad():
        logits = pol.model(**inputs).logits[0, -1]
    logits[pol.never_sample_ids] = float("-inf")
    top2 = set(logits.topk(2).indices.tolist())
    gen = engine.generate(pol.model, inputs, GenerationSettings(1, top_k=2), device=CPU, num_samples=64)
    first = set(gen.completion_ids[:, 0].tolist())
    assert first <= top2 and len(first) == 2


@pytest.mark.slow
def test_training_logs_the_rollout_logprob_check_and_applies_is_correction(tmp_path, tiny_overrides):
    """The engine's sampling log-probs and the trainer's recomputation agree (float32, CPU), so
    the truncated-IS weights are 1 and the run matches one without correction."""
    import json
    from pathlib import Path

    from mmpo.cli import main

    quick = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    lines = {}
    for mode in ("none", "token_tis"):
        run = tmp_path / mode
        args = [
            "train",
            quick,
            f"output_dir={run}",
            "trainer.max_steps=2",
            f"rollout.is_correction={mode}",
            *tiny_overrides,
        ]
        assert main(args) == 0
        lines[mode] = [
            json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] > 0
        ]
    for line in lines["token_tis"]:
        assert line["rollout/logprob_abs_diff"] < 1e-5
        assert line["rollout/is_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    for a, b in zip(lines["none"], lines["token_tis"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_inverse_cdf_sampler_matches_the_probabilities_and_skips_zero_mass():
    from mmpo.rollout.engines.hf import _sample

    torch.manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]]).repeat(100_000, 1)
    freq = torch.bincount(_sample(probs), minlength=5).float() / 100_000
    assert freq[0] == 0 and freq[2] == 0
    assert (freq - probs[0]).abs().max() < 0.01  # ~6 standard errors


def test_min_new_tokens_keeps_eos_out_until_then():
    torch.manual_seed(1)
    pol = _policy("qwen2")
    _favour_eos(pol, 8.0)  # EOS would almost always come first
    inputs = pol.collate(_encodings(pol, 2))
    gen = HFGenerateEngine(pol).generate(
        pol.model, inputs, GenerationSettings(8, min_new_tokens=5), device=CPU, num_samples=4
    )
    assert (gen.mask.sum(1) >= 6).all()  # 5 forced tokens, then EOS (counted in the mask)
    assert (gen.mask.sum(1) <= 7).any()
    free = HFGenerateEngine(pol).generate(pol.model, inputs, GenerationSettings(8), device=CPU, num_samples=4)
    assert (free.mask.sum(1) <= 2).float().mean() > 0.5


def test_unknown_engine_option_is_refused_at_load():
    """`rollout.engine_options` keys the engine does not read fail before any model loads."""
    import pytest

    from mmpo.errors import ConfigError
    from mmpo.rollout import ROLLOUT_ENGINES

    engine = ROLLOUT_ENGINES.get("hf")
    engine.check_environment({"use_generate": True})
    with pytest.raises(ConfigError, match=r"engine_options\.use_generat\b.*Did you mean 'use_generate'"):
        engine.check_environment({"use_generat": True})


def test_a_per_row_temperature_function_samples_and_reports_at_that_temperature():
    """HAPO's adaptive temperature: ``temperature_fn`` (logits -> [n]) replaces the temperature;
    each row's sampling log-probs are those of its own temperature, and with the HAPO map a
    high-entropy step is sampled hotter than a low-entropy one."""
    from mmpo.core.entropy import token_entropy
    from mmpo.core.hapo import adaptive_temperature, apply_hapo_stats, hapo_normalize

    pol = _policy("qwen2")
    encs = _encodings(pol, 2)
    temps = torch.tensor([0.5, 0.5, 2.0, 2.0])  # prompt 0's rows cold, prompt 1's rows hot
    # no row ends early (min_new_tokens = max_new_tokens), so row i stays row i at every step
    settings = GenerationSettings(6, min_new_tokens=6, temperature_fn=lambda logits: temps)
    torch.manual_seed(0)
    gen = HFGenerateEngine(pol).generate(pol.model, pol.collate(encs), settings, device=CPU, num_samples=2)
    rows = [e for e in encs for _ in range(2)]
    for i, t in enumerate(temps.tolist()):
        with torch.no_grad():
            ref = pol.score([rows[i]], gen.completion_ids[i : i + 1], gen.mask[i : i + 1], temperature=t).logp
        m = gen.mask[i]
        assert (ref[0][m] - gen.logprobs[i][m]).abs().max() < 1e-5, i
    # the HAPO map: statistics from a spread of entropies, then a flat and a peaked distribution
    _, stats = hapo_normalize(torch.tensor([[0.2, 0.5, 1.0, 2.0, 3.0]]), torch.ones(1, 5, dtype=torch.bool))
    flat, peaked = torch.zeros(1, 50), torch.tensor([[20.0] + [0.0] * 49])
    h = apply_hapo_stats(token_entropy(torch.cat([flat, peaked])), stats)
    t = adaptive_temperature(h, 1.0, 0.05)
    assert t[0] > 1.0 > t[1] and 0.95 - 1e-6 <= float(t.min()) and float(t.max()) <= 1.05 + 1e-6
