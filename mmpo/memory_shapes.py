"""Model shapes for the memory estimate (:mod:`mmpo.memory_estimate`), read without loading weights.

``model_shape(cfg.model)`` reads a local folder's ``config.json`` (or, for ``tiny:<kind>``, the
sizes of :class:`mmpo.tiny.TinySizes` with the ``model.tiny`` overrides) and counts parameters
analytically for the Qwen2 / Qwen3 / Qwen2-VL / Qwen2.5-VL layouts (and Llama-like text decoders);
``tests/test_memory_estimate.py`` checks the counts against ``sum(p.numel())`` of the built models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpo.errors import ConfigError


class EstimateUnavailable(ConfigError):
    """The estimate cannot be made for this model or trainer kind (the message says why)."""


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder LM and, for VLMs, its vision tower (0 fields when there is none)."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = True
    qk_norm: bool = False
    v_depth: int = 0
    v_embed: int = 0
    v_mlp: int = 0  # vision MLP width (Qwen2-VL: embed * mlp_ratio; Qwen2.5-VL: intermediate_size)
    v_gated: bool = False  # Qwen2.5-VL's gated MLP vs Qwen2-VL's fc1/fc2
    v_out: int = 0
    patch: int = 14
    merge: int = 2
    temporal: int = 2
    max_pixels: int = 0
    min_pixels: int = 0

    @property
    def is_vlm(self) -> bool:
        return self.v_depth > 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def text_linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear of one decoder layer, by module name suffix."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def vision_linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear of one vision block, by module name suffix."""
        e, m = self.v_embed, self.v_mlp
        dims = {"attn.qkv": (e, 3 * e), "attn.proj": (e, e)}
        if self.v_gated:
            dims.update({"mlp.gate_proj": (e, m), "mlp.up_proj": (e, m), "mlp.down_proj": (m, e)})
        else:
            dims.update({"mlp.fc1": (e, m), "mlp.fc2": (m, e)})
        return dims

    def text_params(self) -> int:
        """Embedding, decoder layers, final norm and (untied) LM head."""
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        linear = sum(a * b for a, b in self.text_linear_dims().values())
        bias = (q + 2 * kv) if self.qkv_bias else 0
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        layer = linear + bias + norms
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def vision_params(self) -> int:
        """Patch embedding, blocks and patch merger of a Qwen2-VL / Qwen2.5-VL vision tower."""
        if not self.is_vlm:
            return 0
        e, s2 = self.v_embed, self.merge**2
        patch = 3 * self.temporal * self.patch * self.patch * e
        linear = sum(a * b + b for a, b in self.vision_linear_dims().values())  # every vision Linear has a bias
        norms = 2 * e if self.v_gated else 4 * e  # RMSNorm (2.5-VL) or LayerNorm with bias (2-VL)
        merger = (e if self.v_gated else 2 * e) + (e * s2) ** 2 + e * s2 + e * s2 * self.v_out + self.v_out
        return patch + self.v_depth * (linear + norms) + merger

    def params(self) -> int:
        return self.text_params() + self.vision_params()


def _tiny_shape(kind: str, overrides: dict[str, Any]) -> ModelShape:
    from mmpo.tiny import TINY_KINDS, TinySizes, build_tokenizer

    TINY_KINDS.get(kind)  # an unknown kind raises, listing the valid ones
    s = TinySizes.from_overrides(dict(overrides))
    vocab = s.model_vocab_size if s.model_vocab_size is not None else len(build_tokenizer(s.vocab_size))
    vl = kind in ("qwen2_vl", "qwen2_5_vl")
    gated = kind == "qwen2_5_vl"
    return ModelShape(
        model_type=kind,
        vocab=vocab,
        hidden=s.hidden_size,
        intermediate=s.intermediate_size,
        layers=s.num_hidden_layers,
        heads=s.num_attention_heads,
        kv_heads=s.num_key_value_heads,
        head_dim=s.text_head_dim(),
        tied=s.tie_word_embeddings,
        qkv_bias=kind != "qwen3",
        qk_norm=kind == "qwen3",
        v_depth=s.vision_depth if vl else 0,
        v_embed=s.vision_embed_dim if vl else 0,
        v_mlp=(s.vision_intermediate_size if gated else s.vision_embed_dim * s.vision_mlp_ratio) if vl else 0,
        v_gated=gated,
        v_out=s.hidden_size if vl else 0,
        patch=s.patch_size,
        merge=s.spatial_merge_size,
        temporal=s.temporal_patch_size,
        max_pixels=s.max_pixels if vl else 0,
        min_pixels=s.min_pixels if vl else 0,
    )


def _folder_shape(folder: Path) -> ModelShape:
    cfg = json.loads((folder / "config.json").read_text())
    text = {**cfg, **cfg.get("text_config", {})}
    mt = str(cfg.get("model_type", ""))
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if k not in text]
    if missing:
        raise EstimateUnavailable(f"no memory estimate for model type {mt!r}: its config.json has no {missing}")
    heads = int(text["num_attention_heads"])
    hd = int(text.get("head_dim") or text["hidden_size"] // heads)
    vc = cfg.get("vision_config") or {}
    gated = mt == "qwen2_5_vl"
    if vc and mt not in ("qwen2_vl", "qwen2_5_vl"):
        raise EstimateUnavailable(
            f"no memory estimate for the vision tower of model type {mt!r} (Qwen2-VL family only)"
        )
    pre = {}
    if (folder / "preprocessor_config.json").is_file():
        pre = json.loads((folder / "preprocessor_config.json").read_text())
    size = pre.get("size") or {}
    v_embed = int(vc.get("hidden_size" if gated else "embed_dim", 0)) if vc else 0
    return ModelShape(
        model_type=mt,
        vocab=int(text["vocab_size"]),
        hidden=int(text["hidden_size"]),
        intermediate=int(text["intermediate_size"]),
        layers=int(text["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=hd,
        tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        qkv_bias=mt in ("qwen2", "qwen2_vl", "qwen2_5_vl") or bool(text.get("attention_bias", False)),
        qk_norm=mt.startswith("qwen3"),
        v_depth=int(vc.get("depth", 0)),
        v_embed=v_embed,
        v_mlp=int(vc.get("intermediate_size", 0)) if gated else int(v_embed * vc.get("mlp_ratio", 4)),
        v_gated=gated,
        v_out=int(vc.get("out_hidden_size", vc.get("hidden_size", 0)) if gated else vc.get("hidden_size", 0)),
        patch=int(vc.get("patch_size", 14)),
        merge=int(vc.get("spatial_merge_size", 2)),
        temporal=int(vc.get("temporal_patch_size", 2)),
        max_pixels=int(pre.get("max_pixels") or size.get("longest_edge") or 0),
        min_pixels=int(pre.get("min_pixels") or size.get("shortest_edge") or 0),
    )


def model_shape(model_cfg: Any) -> ModelShape:
    """The :class:`ModelShape` of ``model.path`` (config.json only; no weights are read or built)."""
    path = str(model_cfg.path)
    if path.startswith("tiny:"):
        return _tiny_shape(path[len("tiny:") :], model_cfg.tiny)
    from mmpo.hub import local_model_folder
    from mmpo.models import is_adapter_folder

    folder = local_model_folder(path)
    if is_adapter_folder(folder):
        if not (folder / "merged" / "config.json").is_file():
            raise EstimateUnavailable(f"no memory estimate for adapter folder {path!r} without merged/")
        folder = folder / "merged"
    return _folder_shape(folder)
