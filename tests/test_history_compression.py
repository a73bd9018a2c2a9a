"""Anchor-guided History Compression (HiconAgent): history screenshots dropped at a decoder layer."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmpo.errors import ConfigError
from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.policies.history_compression import ahc_flops, compressed_hidden_states, history_image_mask

KINDS = ["qwen2_5_vl", "qwen2_vl"]


def _policy(kind: str, attn: str = "sdpa", layers: int = 3) -> CausalLMPolicy:
    model, proc, info = load_model(
        f"tiny:{kind}", seed=0, attn_implementation=attn, tiny_overrides={"num_hidden_layers": layers}
    )
    return CausalLMPolicy.from_info(model, proc, info)


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _episode(task: str, steps: list[tuple[tuple[int, int], str]], current: tuple[int, int], seed: int) -> list[dict]:
    """A GUI-agent prompt: task, (screenshot, action) history, current screenshot."""
    content: list[dict] = [{"type": "text", "text": f"Task: {task}. History:"}]
    for j, (size, action) in enumerate(steps):
        content += [
            {"type": "image", "image": _image(*size, seed + j)},
            {"type": "text", "text": f"Action {j}: {action}"},
        ]
    content += [{"type": "text", "text": "Current screen:"}, {"type": "image", "image": _image(*current, seed + 99)}]
    return [{"role": "user", "content": content}]


def _batch(pol: CausalLMPolicy, history: bool) -> dict[str, torch.Tensor]:
    """Two left-padded rows of different lengths: 2 + 1 history screenshots (or none)."""
    if history:
        a = _episode("open settings", [((56, 56), "click(3, 4)"), ((84, 56), "scroll down")], (56, 56), 0)
        b = _episode("call mom and say hello there", [((56, 112), "type hello")], (56, 56), 10)
    else:
        a = _episode("open settings", [], (56, 56), 0)
        b = _episode("call mom and then say hello there please", [], (84, 56), 10)
    return pol.collate([pol.encode(a), pol.encode(b)])


def _drop(pol: CausalLMPolicy, full: dict[str, torch.Tensor]) -> torch.Tensor:
    c = pol.model.config
    return history_image_mask(full["input_ids"], c.image_token_id, c.vision_start_token_id, c.vision_end_token_id)


def _completions(n: int, T: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 300, (n, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 3:] = False  # EOS early in row 1: right padding in the completion
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("history", [False, True])
def test_nothing_dropped_equals_full_branch(kind, attn, history):
    pol = _policy(kind, attn)
    full = _batch(pol, history)
    assert full["attention_mask"][:, 0].tolist().count(0) == 1  # one row is left-padded
    drop = _drop(pol, full)
    if history:  # all-False drop on a history prompt
        assert drop.any()
        drop = torch.zeros_like(drop)
    else:  # a single image per row: nothing is history
        assert not drop.any()
    decoder = pol.model.model
    with torch.no_grad():
        ref = decoder(**full, use_cache=False).last_hidden_state
        out = compressed_hidden_states(decoder, full, drop, 1)
    assert out.hidden.shape == ref.shape
    torch.testing.assert_close(out.hidden, ref, atol=1e-5, rtol=0)
    assert torch.equal(out.index, torch.arange(ref.shape[1]).expand(2, -1))

    if not history:  # log_probs through the compressed branch (nothing to drop) equal the plain ones
        ids, mask = _completions(2)
        with torch.no_grad():
            plain = pol.log_probs(full, ids, mask)
            same = pol.log_probs(full, ids, mask, compress_layer=1)
        torch.testing.assert_close(same.logp[mask], plain.logp[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(same.entropy[mask], plain.entropy[mask], atol=1e-5, rtol=0)


def test_history_image_mask_on_hand_built_ids():
    IMG, VS, VE, VID, PAD = 7, 5, 6, 8, 0
    ids = torch.tensor(
        [
            [PAD, PAD, 1, VS, IMG, IMG, VE, 2, VS, IMG, VE, 3, VS, IMG, IMG, VE, 4],
            [PAD, PAD, PAD, PAD, PAD, 1, VS, IMG, VE, 2, VS, VID, VID, VE, 3, 4, 4],  # image then a video
            [1, VS, IMG, VE, 2, VS, IMG, IMG, IMG, VE, 3, 3, 3, 3, 3, 3, 3],
        ]
    )
    expected = torch.zeros_like(ids, dtype=torch.bool)
    expected[0, 3:7] = True
    expected[0, 8:11] = True
    expected[2, 1:4] = True
    assert torch.equal(history_image_mask(ids, IMG, VS, VE), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_history_image_mask_marks_all_images_but_the_last(kind):
    pol = _policy(kind)
    full = _batch(pol, history=True)
    c = pol.model.config
    drop = _drop(pol, full)
    ids = full["input_ids"]
    merge = c.vision_config.spatial_merge_size**2
    tokens = (full["image_grid_thw"].prod(-1) // merge).tolist()  # images in row order: 3 of row 0, 2 of row 1
    per_row = [tokens[:3], tokens[3:]]
    for r, imgs in enumerate(per_row):
        assert int(drop[r].sum()) == sum(t + 2 for t in imgs[:-1])
        marked = ids[r][drop[r]]
        assert set(marked.tolist()) <= {c.image_token_id, c.vision_start_token_id, c.vision_end_token_id}
        assert int((marked == c.image_token_id).sum()) == sum(imgs[:-1])
        # the last image's pads (the last pads of the row) and all text are kept
        pads = (ids[r] == c.image_token_id).nonzero().view(-1)
        assert not drop[r, pads[-imgs[-1] :]].any() and drop[r, pads[: -imgs[-1]]].all()
        vision = torch.tensor([c.image_token_id, c.vision_start_token_id, c.vision_end_token_id])
        assert not drop[r, ~torch.isin(ids[r], vision)].any()
    assert not drop[:, -8:].any()  # the prompt's tail (current screenshot, generation prompt)


def _reference_row(pol: CausalLMPolicy, full: dict, row: int, cols: torch.Tensor, layer: int) -> torch.Tensor:
    """Independent reference for one row: the model's own hidden states before ``layer``
    (``output_hidden_states``) at the kept columns, then the model's own language model with only
    layers ``layer..N-1``, on that row alone (no padding) at explicit positions."""
    decoder = pol.model.model
    lm = decoder.language_model
    hs = decoder(**full, output_hidden_states=True, use_cache=False).hidden_states[layer]  # input of `layer`
    pos, _ = decoder.get_rope_index(
        full["input_ids"],
        image_grid_thw=full["image_grid_thw"],
        attention_mask=full["attention_mask"],
        mm_token_type_ids=full["mm_token_type_ids"],
    )
    layers = lm.layers
    try:
        lm.layers = torch.nn.ModuleList(list(layers)[layer:])  # all full-attention, so layer_types still line up
        return lm(
            inputs_embeds=hs[row, cols][None],
            position_ids=pos[:, row, cols][:, None],
            attention_mask=torch.ones(1, len(cols), dtype=torch.long),
            use_cache=False,
        ).last_hidden_state[0]
    finally:
        lm.layers = layers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layer", [0, 2])
def test_dropped_history_matches_independent_reference(kind, attn, layer):
    pol = _policy(kind, attn)
    decoder = pol.model.model
    full = _batch(pol, history=True)
    drop = _drop(pol, full)
    seen: list[torch.Tensor] = []
    hook = decoder.language_model.rotary_emb.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    try:
        with torch.no_grad():
            out = compressed_hidden_states(decoder, full, drop, layer)
            plain = decoder(**full, use_cache=False).last_hidden_state
    finally:
        hook.remove()
    L = full["input_ids"].shape[1]
    dropped = drop.sum(1)
    assert dropped[0] != dropped[1]
    L2 = L - int(dropped.min())
    assert out.hidden.shape[:2] == (2, L2)
    valid_before = full["attention_mask"].sum(1)
    assert out.attention_mask.sum(1).tolist() == (valid_before - dropped).tolist()

    full_pos, _ = decoder.get_rope_index(
        full["input_ids"],
        image_grid_thw=full["image_grid_thw"],
        attention_mask=full["attention_mask"],
        mm_token_type_ids=full["mm_token_type_ids"],
    )
    stage2_pos = seen[1]  # positions handed to the rotary embedding for layers layer..N-1
    assert stage2_pos.shape == (3, 2, L2)
    for r in range(2):
        cols = ((~drop[r]) & full["attention_mask"][r].bool()).nonzero().view(-1)  # kept valid tokens, in order
        valid = out.attention_mask[r].bool()
        assert valid[-len(cols) :].all() and not valid[: L2 - len(cols)].any()  # left-padded, tail-aligned
        assert torch.equal(out.index[r, valid], cols)
        assert torch.equal(stage2_pos[:, r, valid], full_pos[:, r, cols])
        with torch.no_grad():
            ref = _reference_row(pol, full, r, cols, layer)
        torch.testing.assert_close(out.hidden[r, valid], ref, atol=1e-5, rtol=0)
    # the compressed branch is not the full one: the current screenshot saw no history after `layer`
    assert (out.hidden[:, -8:] - plain[:, -8:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_compressed_log_probs_backward_and_score(kind):
    pol = _policy(kind)
    pol.model.train()
    full = _batch(pol, history=True)
    ids, mask = _completions(2)
    out = pol.log_probs(full, ids, mask, compress_layer=1)
    with torch.no_grad():
        plain = pol.log_probs(full, ids, mask)
    assert (out.logp - plain.logp)[mask].abs().max() > 1e-4  # compression changes the scores
    ((out.logp * mask).sum() + 0.1 * (out.entropy * mask).sum()).backward()
    grads = {k: p.grad for k, p in pol.model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    # dropped history screenshots still feed layers 0..k-1: the vision tower and layer 0 get gradient
    assert any(k.startswith("model.visual.") and g.abs().sum() > 0 for k, g in grads.items())
    assert any(".layers.0." in k and g.abs().sum() > 0 for k, g in grads.items())

    # score: compress_layer takes the plain (not shared-prefix) forward, even for repeated encodings
    a = pol.encode(_episode("open settings", [((56, 56), "click(3, 4)")], (56, 56), 0))
    encodings = [a, a]
    with torch.no_grad():
        scored = pol.score(encodings, ids, mask, compress_layer=1)
        direct = pol.log_probs(pol.collate(encodings), ids, mask, compress_layer=1)
    torch.testing.assert_close(scored.logp, direct.logp, atol=1e-6, rtol=0)


def test_errors_name_the_setting():
    text_model, tok, info = load_model("tiny:qwen2", seed=0)
    text_pol = CausalLMPolicy.from_info(text_model, tok, info)
    enc = text_pol.collate([text_pol.encode([{"role": "user", "content": "hello"}])])
    ids, mask = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="compress_layer"):
        text_pol.log_probs(enc, ids, mask, compress_layer=1)

    pol = _policy("qwen2_5_vl")
    full = _batch(pol, history=True)
    for bad in (3, -1, 6):
        with pytest.raises(ConfigError, match="drop_layer"):
            compressed_hidden_states(pol.model.model, full, _drop(pol, full), bad)


def test_ahc_flops_counts():
    pol = _policy("qwen2_5_vl", layers=4)
    cfg = pol.model.config
    same = ahc_flops(cfg, 100, 100, 2)
    assert same["full"] == same["compressed"] and same["ratio"] == 1.0
    half = ahc_flops(cfg, 100, 50, 0)
    t = cfg.text_config
    params_per_layer = sum(
        p.numel()
        for n, p in pol.model.model.language_model.layers[0].named_parameters()
        if n.endswith("weight") and "norm" not in n
    )
    per_layer_full = 2 * params_per_layer * 100 + 4 * 100**2 * t.hidden_size
    assert half["full"] == pytest.approx(4 * per_layer_full)
    assert 0.25 < half["ratio"] < 0.5


def test_bench_ahc_reports_kept_tokens_and_ratios():
    from mmpo.bench_ahc import run_ahc_bench

    rows = run_ahc_bench(drop_layers=(2, 6), history=2, image_size=56, completion_len=4, repeats=1)
    assert [r["drop_layer"] for r in rows] == [2, 6]
    for r in rows:
        assert r["image_tokens"] == 3 * (56 // 28) ** 2
        assert r["tokens_dropped"] == 2 * ((56 // 28) ** 2 + 2)  # two history screenshots with start/end
        assert r["tokens_kept"] == r["tokens_full"] - r["tokens_dropped"]
        assert 0 < r["flops_ratio"] < 1 and r["full_policy_pass_s"] > 0 and r["compressed_policy_pass_s"] > 0
    assert rows[0]["flops_ratio"] < rows[1]["flops_ratio"]  # dropping earlier saves more
