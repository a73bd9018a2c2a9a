"""``mmpo bench ahc``: what HiconAgent's history compression saves on a GUI-agent prompt.

A small Qwen2.5-VL built from a config (random weights, float32) scores a group of completions
after one prompt (instruction + ``history`` (screenshot, action) pairs + the current screenshot):
the full branch vs the compressed branch (history screenshots dropped at ``drop_layer``), one
policy pass each (forward + backward). Prints one JSON line per drop layer with medians over
``repeats`` runs and the analytic decoder FLOPs (``ahc_flops``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from PIL import Image

from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.policies.history_compression import ahc_flops, history_image_mask

#: the "small but not tiny" model: 8 decoder layers of width 256 (about 6M decoder parameters)
MODEL = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vision_depth": 2,
    "vision_embed_dim": 128,
    "vision_num_heads": 2,
    "vision_intermediate_size": 256,
}
ACTIONS = ["click(120, 48)", 'type("weather tomorrow")', "scroll(down)", "press(enter)", "back()"]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _screenshot(size: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())


def _messages(history: int, image_size: int) -> list[dict[str, Any]]:
    task = "Task: open the weather app and check tomorrow's forecast. Previous steps:"
    content: list[dict[str, Any]] = [{"type": "text", "text": task}]
    for j in range(history):
        content += [
            {"type": "image", "image": _screenshot(image_size, j)},
            {"type": "text", "text": f"Step {j + 1} action: {ACTIONS[j % len(ACTIONS)]}"},
        ]
    content += [
        {"type": "text", "text": "Current screen:"},
        {"type": "image", "image": _screenshot(image_size, 99)},
        {"type": "text", "text": "Think, then give the next action as <think>...</think><action>...</action>."},
    ]
    return [{"role": "user", "content": content}]


def run_ahc_bench(
    *,
    drop_layers: tuple[int, ...] = (2, 6),
    history: int = 3,
    image_size: int = 224,
    group_size: int = 1,
    completion_len: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Seconds of one policy pass (forward + backward) over a group, full vs compressed branch."""
    model, proc, info = load_model(
        "tiny:qwen2_5_vl", seed=seed, tiny_overrides={**MODEL, "max_pixels": image_size * image_size}
    )
    pol = CausalLMPolicy.from_info(model, proc, info)
    enc = pol.encode(_messages(history, image_size))
    cfg = model.config
    drop = history_image_mask(enc["input_ids"], cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    prompt_tokens = int(enc["input_ids"].shape[1])
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (group_size, completion_len), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    prompts = pol.collate([enc] * group_size)
    full_tokens = prompt_tokens + completion_len
    kept_tokens = full_tokens - int(drop.sum())

    def policy_pass(layer: int | None) -> None:
        model.zero_grad(set_to_none=True)
        out = pol.log_probs(prompts, ids, mask, compress_layer=layer)
        (out.logp.sum() + out.entropy.sum()).backward()

    policy_pass(None)  # warm-up
    branches: tuple[int | None, ...] = (None, *drop_layers)
    times: dict[int | None, list[float]] = {b: [] for b in branches}
    for _ in range(repeats):  # branches alternate, so a busy machine slows them alike
        for branch in branches:
            times[branch].append(_timed(lambda: policy_pass(branch)))
    full_s = statistics.median(times[None])
    decoder_params = sum(p.numel() for p in model.model.language_model.parameters())
    results = []
    for layer in drop_layers:
        comp_s = statistics.median(times[layer])
        flops = ahc_flops(cfg, full_tokens, kept_tokens, layer)
        results.append(
            {
                "model": f"qwen2_5_vl hidden {MODEL['hidden_size']} x {MODEL['num_hidden_layers']} layers",
                "decoder_params": decoder_params,
                "drop_layer": layer,
                "history_screenshots": history,
                "image_size": image_size,
                "image_tokens": int((enc["input_ids"] == cfg.image_token_id).sum()),
                "group_size": group_size,
                "completion_tokens": completion_len,
                "tokens_full": full_tokens,
                "tokens_kept": kept_tokens,
                "tokens_dropped": full_tokens - kept_tokens,
                "threads": torch.get_num_threads(),
                "decoder_forward_gflops_full": round(flops["full"] * group_size / 1e9, 3),
                "decoder_forward_gflops_compressed": round(flops["compressed"] * group_size / 1e9, 3),
                "flops_ratio": round(flops["ratio"], 3),
                "full_policy_pass_s": round(full_s, 4),
                "compressed_policy_pass_s": round(comp_s, 4),
                "time_ratio": round(comp_s / full_s, 3),
            }
        )
    return results
