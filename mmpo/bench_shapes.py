"""Real model shapes for ``mmpo bench --against trl``, the machine's matmul peak, and model FLOPs.

The real-shape settings build random weights offline at the published dimensions (no download):
``text-0.5b`` is Qwen2.5-0.5B (24 layers, width 896, 151,936 vocabulary rows), ``vlm-2b-lora`` is
Qwen2-VL-2B (28 layers, width 1536, a 32-block 1280-wide vision tower) with LoRA rank 16 on the
language model's attention projections and bf16 frozen weights. The tokenizer stays the tiny one
(512 tokens); the other embedding rows are padding no token maps to, which both frameworks never
sample but still project onto (the cost of the real vocabulary is kept).

Model FLOPs follow the usual accounting (Kaplan et al. 2020, arXiv:2001.08361; PaLM's MFU,
arXiv:2204.02311): a matmul with a ``[m, k]`` weight costs ``2 m k`` per token forward and twice
that backward, attention scores ``2 * 2 * layers * heads * head_dim`` per (query, key) pair. They
count what the step's rows need as if each row were processed alone (prompt re-encoded per row,
logits at every completion position), the same number for both frameworks: work a framework skips
(shared prefixes) shows as a higher utilisation, not as fewer FLOPs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    model_vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)
QWEN2_VL_2B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    model_vocab_size=151936,
    tie_word_embeddings=True,
    mrope_section=[16, 24, 24],
    vision_depth=32,
    vision_embed_dim=1280,
    vision_num_heads=16,
    vision_mlp_ratio=4,
    max_position_embeddings=32768,
)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark setting's model: tiny kind, its size overrides and how it trains."""

    kind: str  # mmpo.tiny kind
    sizes: dict[str, Any]
    image: bool  # prompts carry one image
    precision: str  # "fp32" | "bf16" (both sides)
    lora_r: int = 0  # 0: full fine-tuning; else LoRA rank on the language model's q/k/v/o projections
    frozen_bf16: bool = False  # frozen weights (LoRA's base) held in bf16
    real: bool = False  # a real-size shape: run the two sides one at a time (memory)
    beta: float = 0.04  # KL coefficient (k3 in the loss) unless the bench is given one
    prompts_per_step: int = 4
    max_new_tokens: int = 32
    image_size: int = 560  # px; 560: (560 / 28)^2 = 400 image tokens, 448: 256


SHAPES: dict[str, Shape] = {
    "text": Shape("qwen2", {}, image=False, precision="fp32"),
    "vlm": Shape("qwen2_vl", {}, image=True, precision="fp32"),
    # the vlm-2b-lora recipe (LoRA r 16, bf16 frozen weights) on the tiny VLM: a quick check of that path
    "vlm-lora": Shape("qwen2_vl", {}, image=True, precision="bf16", lora_r=16, frozen_bf16=True),
    "text-0.5b": Shape(
        "qwen2", QWEN25_05B, image=False, precision="fp32", real=True, beta=0.0, prompts_per_step=2, max_new_tokens=64
    ),
    "vlm-2b-lora": Shape(
        "qwen2_vl",
        QWEN2_VL_2B,
        image=True,
        precision="bf16",
        lora_r=16,
        frozen_bf16=True,
        real=True,
        beta=0.0,
        prompts_per_step=2,
        max_new_tokens=64,
        image_size=448,
    ),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def matmul_peak_gflops(threads: int, dtype_name: str, n: int = 2048, repeats: int = 5, device: str = "") -> float:
    """The best GFLOP/s of an ``[n, n] @ [n, n]`` matmul in ``dtype_name`` ("fp32" | "bf16") with
    ``threads`` torch threads, after one warm-up (the peak a model's matmuls can reach here).
    ``device``: "cpu", "cuda" or "" (CUDA when available; there ``n`` is raised to 8192)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        n = max(n, 8192)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        torch.mm(a, b)
        sync()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best / 1e9
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass
class ModelDims:
    """What the FLOP count needs of a model config (read from its ``config.json``)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_params: int = 0  # matmul weights of the vision tower (0: a text LM)
    vision_attn: int = 0  # depth x width of the vision tower (its attention cost per patch pair / 4)
    patch_merge: int = 4  # image patches per language token (spatial merge 2 x 2)

    @property
    def layer_params(self) -> int:
        """Matmul weights of one decoder layer (q, k, v, o and the gated MLP)."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_o + kv + 3 * self.hidden * self.intermediate

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ModelDims":
        text = cfg.get("text_config") or cfg
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        vision = vision_attn = 0
        vc = cfg.get("vision_config")
        if vc:
            d = vc.get("embed_dim") or vc["hidden_size"]
            mlp = vc.get("intermediate_size") or int(d * vc.get("mlp_ratio", 4))
            out = vc.get("hidden_size", text["hidden_size"])
            merge = vc.get("spatial_merge_size", 2) ** 2
            patch_in = 3 * vc.get("temporal_patch_size", 2) * vc.get("patch_size", 14) ** 2
            # per patch: embedding, depth x (qkv + proj + MLP), the merger's 2-layer MLP per merged token
            per_block = 4 * d * d + 2 * d * mlp
            vision = patch_in * d + vc["depth"] * per_block + (d * merge) ** 2 // merge + d * merge * out // merge
            vision_attn = vc["depth"] * d
        return cls(
            layers=text["num_hidden_layers"],
            hidden=text["hidden_size"],
            intermediate=text["intermediate_size"],
            heads=heads,
            kv_heads=text.get("num_key_value_heads", heads),
            head_dim=head_dim,
            vocab=text["vocab_size"],
            vision_params=vision,
            vision_attn=vision_attn,
        )


def step_flops(
    dims: ModelDims,
    *,
    rows: int,
    prompt_tokens: float,
    completion_tokens: float,
    image_tokens: float = 0.0,
    lora: bool = False,
    vision_trained: bool = False,
    reference: bool = False,
) -> dict[str, float]:
    """Model FLOPs of one GRPO step over ``rows`` rows of ``prompt_tokens`` (image tokens included)
    + ``completion_tokens`` each: sampling (prefill + decode, logits at each sampled position),
    the reference pass (``reference``: beta > 0), and the policy pass with backward (LoRA: input
    gradients only, frozen weights get none; the vision tower's backward only when
    ``vision_trained``). Returns FLOPs per part and ``total``."""
    P, C, L = float(prompt_tokens), float(completion_tokens), dims.layers
    S = P + C
    mm = 2 * dims.layer_params * L  # per token, forward
    head = 2 * dims.hidden * dims.vocab  # per scored position, forward
    attn_pair = 2 * 2 * L * dims.heads * dims.head_dim  # per (query, key) pair, forward
    patches = image_tokens * dims.patch_merge
    vision = 2 * dims.vision_params * patches + 2 * 2 * dims.vision_attn * patches**2  # per row, forward
    text = mm * S + head * C + attn_pair * S * (S + 1) / 2  # per row, forward
    backward = 1.0 if lora else 2.0  # LoRA: d(input) only; full: d(input) + d(weight)
    out = {
        "sampling": rows * (text + vision),  # prefill + decode visit the same tokens and pairs
        "reference": rows * (text + vision) if reference else 0.0,
        "policy": rows * ((1 + backward) * text + (1 + (backward if vision_trained else 0.0)) * vision),
    }
    out["total"] = sum(out.values())
    return out
