"""The token policy: log-probs equal a plain forward, are padding-invariant, chunking-invariant."""

from __future__ import annotations

import pytest
import torch

from mmpo.models import load_model
from mmpo.policies.batching import completion_mask_from_ids
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.engines.hf import GenerationSettings, HFGenerateEngine
from mmpo.tasks import build_task


def _policy(kind: str, chunk: int = 0) -> CausalLMPolicy:
    model, proc, info = load_model(f"tiny:{kind}", seed=0)
    return CausalLMPolicy.from_info(model, proc, info, logprob_chunk_size=chunk)


def _samples(n: int, is_vlm: bool):
    task = build_task("synthetic_vqa", {"num_train": 32}, seed=1)
    samples = [task.train_sample(i) for i in range(n)]
    if not is_vlm:  # text-only prompts of different lengths
        for i, s in enumerate(samples):
            s.messages = [{"role": "user", "content": "word " * (3 + 4 * i) + "answer?"}]
    return samples


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_rollout_logprobs_match_a_plain_forward(kind):
    torch.manual_seed(0)
    pol = _policy(kind)
    samples = _samples(3, pol.is_vlm)
    encs = [pol.encode(s.messages) for s in samples]
    inputs = pol.collate(encs)
    gen = HFGenerateEngine(pol).generate(pol.model, inputs, GenerationSettings(6), device=torch.device("cpu"))
    ids, mask = gen.completion_ids, gen.mask
    assert ids.shape[0] == 3 and mask[:, 0].all()
    # never-sampled special tokens do not appear among valid tokens
    assert not torch.isin(ids[mask], torch.tensor(pol.never_sample_ids)).any()

    got = pol.log_probs(inputs, ids, mask).logp
    for row in range(3):  # unbatched, unpadded reference: full forward, log-softmax, gather
        enc = encs[row]
        n = int(mask[row].sum())
        full_ids = torch.cat([enc["input_ids"], ids[row : row + 1, :n]], dim=1)
        kwargs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if "mm_token_type_ids" in enc:
            kwargs["mm_token_type_ids"] = torch.nn.functional.pad(enc["mm_token_type_ids"], (0, n))
        with torch.no_grad():
            logits = pol.model(input_ids=full_ids, **kwargs).logits[0].float()
        logits[:, pol.never_sample_ids] = float("-inf")
        P = enc["input_ids"].shape[1]
        ref = torch.log_softmax(logits[P - 1 : P - 1 + n], -1).gather(-1, ids[row, :n, None]).squeeze(-1)
        torch.testing.assert_close(got[row, :n], ref, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(got[row]).all()  # padding after EOS is scored finitely


def test_chunked_vocab_projection_matches_one_chunk_with_gradients():
    torch.manual_seed(0)
    pol_a, pol_b = _policy("qwen2_vl", chunk=1), _policy("qwen2_vl", chunk=64)
    samples = _samples(2, True)
    inputs = pol_a.collate([pol_a.encode(s.messages) for s in samples])
    ids = torch.randint(0, 300, (2, 5))
    mask = torch.ones_like(ids, dtype=torch.bool)
    outs = []
    for pol in (pol_a, pol_b):
        out = pol.log_probs(inputs, ids, mask)
        (out.logp.sum() + out.entropy.sum()).backward()
        grad = pol.model.get_output_embeddings().weight.grad.clone()
        outs.append((out.logp.detach(), out.entropy.detach(), grad))
    for x, y in zip(outs[0], outs[1]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    # entropy of a distribution over V tokens is within [0, log V]
    assert (outs[0][1] >= 0).all() and (outs[0][1] <= torch.log(torch.tensor(512.0)) + 1e-4).all()


def test_temperature_scales_logits():
    pol = _policy("qwen2")
    samples = _samples(1, False)
    inputs = pol.collate([pol.encode(s.messages) for s in samples])
    ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        lp1 = pol.log_probs(inputs, ids, mask, temperature=1.0)
        lp_hot = pol.log_probs(inputs, ids, mask, temperature=1e6)
    # at a huge temperature every allowed token is equally likely: log(1 / (V - specials))
    allowed = 512 - len(pol.never_sample_ids)
    torch.testing.assert_close(
        lp_hot.logp, torch.full_like(lp_hot.logp, -torch.log(torch.tensor(float(allowed)))), atol=1e-4, rtol=0
    )
    assert not torch.allclose(lp1.logp, lp_hot.logp)


def test_completion_mask_stops_at_first_eos():
    ids = torch.tensor([[4, 9, 2, 9], [4, 4, 4, 4], [9, 1, 1, 1]])
    mask, truncated = completion_mask_from_ids(ids, [9])
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert truncated.tolist() == [False, True, False]


def test_several_images_and_video_frames_in_one_prompt():
    """Two images and a 4-frame video in one chat prompt: image/video pad tokens match the
    vision features, and log-probs equal those of a batch of one (padding-invariant)."""
    from PIL import Image

    pol = _policy("qwen2_vl")
    red, blue = Image.new("RGB", (56, 56), (200, 30, 30)), Image.new("RGB", (84, 56), (30, 30, 200))
    frames = [Image.new("RGB", (56, 56), (10 * i, 100, 50)) for i in range(4)]
    rich = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": red},
                {"type": "image", "image": blue},
                {"type": "video", "video": frames, "min_pixels": 56 * 56, "max_pixels": 56 * 56},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]
    plain = [{"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "Colour?"}]}]
    enc_rich, enc_plain = pol.encode(rich), pol.encode(plain)
    tok = pol.tokenizer
    n_img = int((enc_rich["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum())
    n_vid = int((enc_rich["input_ids"] == tok.convert_tokens_to_ids("<|video_pad|>")).sum())
    assert n_img == int(enc_rich["image_grid_thw"].prod(-1).sum()) // 4 == 4 + 6
    assert n_vid == int(enc_rich["video_grid_thw"].prod(-1).sum()) // 4 == 8
    ids = torch.tensor([[30, 31, 32], [40, 41, 42]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        both = pol.log_probs(pol.collate([enc_rich, enc_plain]), ids, mask).logp
        alone = pol.log_probs(pol.collate([enc_rich]), ids[:1], mask[:1]).logp
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)
