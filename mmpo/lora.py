"""LoRA (peft) on text LMs and VLMs: where the adapters go, what trains, how it is saved.

Placement. Adapters go on the LANGUAGE model only: ``LoraConfig.target_modules`` are name
suffixes matched by one regular expression that excludes the vision tower (``model.visual`` in
Qwen2-VL / Qwen2.5-VL, whose blocks also hold ``attn.qkv``/``attn.proj`` and, in 2.5-VL,
``mlp.gate_proj``/``up_proj``/``down_proj``). ``LoraConfig.vision`` then sets the tower:

- ``frozen`` (default): no adapter, no gradient (requires_grad False on every tower weight);
- ``lora``: adapters on ``vision_target_modules`` inside the tower as well;
- ``full``: the whole tower trains as a peft ``modules_to_save`` copy. The original stays
  untouched, so ``disable_adapter()`` (the KL reference) still sees the pre-trained tower, and
  the trained copy is written into ``adapter_model.safetensors``.

Without LoRA, ``freeze_vision_tower`` fixes the tower for full fine-tuning
(``model.freeze_vision``).

Saving (`save_lora`). A folder gets the adapter (``adapter_config.json`` +
``adapter_model.safetensors``) and the processor, and ``merged/`` a plain ``save_pretrained``
folder with the adapter merged into the base weights. The merge never touches the training
model: the base is re-read from ``base_model_name_or_path`` (an absolute folder) and the adapter
just written is applied and merged there, on CPU. That is also what makes it work under ZeRO-3:
the adapter is written from the engine's consolidated state dict (``Engine.save_pretrained``
with a ``save_fn``), and the merge needs no gathered parameters. The other ranks wait at the
engine's barrier meanwhile (one extra read of the base weights on the main rank).
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpo.adapters import ADAPTER_CONFIG, MERGED_DIR, read_adapter_config  # noqa: F401  (re-exported)
from mmpo.config import LoraConfig, ModelConfig
from mmpo.errors import ConfigError

__all__ = [
    "ADAPTER_CONFIG",
    "MERGED_DIR",
    "VISION_TOWER_NAMES",
    "vision_tower_prefix",
    "lora_target_regex",
    "apply_lora",
    "freeze_vision_tower",
    "save_lora",
    "merge_adapter",
    "read_adapter_config",
]

#: Attribute names under which VLMs keep their vision tower (Qwen2-VL: ``visual``).
VISION_TOWER_NAMES: tuple[str, ...] = ("visual", "vision_tower", "vision_model")


def vision_tower_prefix(model: nn.Module) -> str | None:
    """Dotted name of the vision tower module (``"model.visual"`` for Qwen2-VL), or None.

    The shallowest module whose own name is one of `VISION_TOWER_NAMES`.
    """
    found = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in VISION_TOWER_NAMES]
    return min(found, key=lambda n: n.count(".")) if found else None


def _suffixes(names: list[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def lora_target_regex(
    target_modules: list[str], vision_prefix: str | None, vision_target_modules: list[str] | None = None
) -> str:
    """peft ``target_modules`` regex (matched with ``re.fullmatch`` on module names).

    A module matches when its name is, or ends with ``.`` + , one of ``target_modules`` and it is
    not inside ``vision_prefix``; or, when ``vision_target_modules`` is given, it is inside
    ``vision_prefix`` and ends with one of those.
    """
    if not target_modules:
        raise ConfigError("model.lora.target_modules is empty: name at least one module (e.g. q_proj).")
    outside = rf"(?!{re.escape(vision_prefix)}\.)" if vision_prefix else ""
    parts = [rf"{outside}(?:.*\.)?(?:{_suffixes(target_modules)})"]
    if vision_target_modules:
        if not vision_prefix:
            raise ConfigError("vision_target_modules need a vision tower, and the model has none.")
        parts.append(rf"{re.escape(vision_prefix)}\.(?:.*\.)?(?:{_suffixes(vision_target_modules)})")
    return "|".join(f"(?:{p})" for p in parts)


def _linear_leaf_names(model: nn.Module, inside: str | None, outside: str | None) -> list[str]:
    """Distinct last name parts of Linear/Conv modules (inside/outside a prefix), for error messages."""
    names = set()
    for n, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if inside and not n.startswith(inside + "."):
            continue
        if outside and n.startswith(outside + "."):
            continue
        names.add(n.rsplit(".", 1)[-1])
    return sorted(names)


def _check_matches(
    model: nn.Module, regex: str, key: str, wanted: list[str], inside: str | None, outside: str | None
) -> None:
    """ConfigError naming ``key`` when no module name fully matches ``regex``."""
    pattern = re.compile(regex)
    hits = [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]
    if not hits:
        where = f"inside the vision tower '{inside}'" if inside else "in the language model"
        raise ConfigError(
            f"{key}={wanted} matches no module {where}; its Linear layers are named "
            f"{_linear_leaf_names(model, inside, outside)}."
        )


def _check_vlm(is_vlm: bool, prefix: str | None, key: str, value: Any) -> None:
    if not is_vlm:
        raise ConfigError(f"{key}={value!r} needs a VLM, but the model is a text LM (no vision tower).")
    if prefix is None:
        raise ConfigError(
            f"{key}={value!r}: the VLM has no module named one of {list(VISION_TOWER_NAMES)} (its vision tower)."
        )


def apply_lora(model: nn.Module, cfg: LoraConfig, *, is_vlm: bool) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with LoRA adapters placed as ``cfg`` says.

    Language model: adapters on ``cfg.target_modules``; vision tower per ``cfg.vision`` (see the
    module docstring). Only adapter weights (and, for ``vision: full``, the tower copy) have
    requires_grad True. ``base_model_name_or_path`` in the adapter config is made absolute when
    it is a local folder, so a saved adapter loads from any working directory.
    Raises ConfigError when a target list matches nothing or a vision mode is set on a text LM.
    """
    import peft

    prefix = vision_tower_prefix(model) if is_vlm else None
    if cfg.vision != "frozen":
        _check_vlm(is_vlm, prefix, "model.lora.vision", cfg.vision)
    vision_targets = list(cfg.vision_target_modules) if cfg.vision == "lora" else None
    _check_matches(
        model,
        lora_target_regex(cfg.target_modules, prefix),
        "model.lora.target_modules",
        list(cfg.target_modules),
        None,
        prefix,
    )
    if vision_targets:
        assert prefix is not None
        _check_matches(
            model,
            rf"{re.escape(prefix)}\.(?:.*\.)?(?:{_suffixes(vision_targets)})",
            "model.lora.vision_target_modules",
            vision_targets,
            prefix,
            None,
        )
    peft_cfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_target_regex(cfg.target_modules, prefix, vision_targets),
        modules_to_save=[prefix] if cfg.vision == "full" else None,
    )
    wrapped = peft.get_peft_model(model, peft_cfg)
    base_path = wrapped.peft_config["default"].base_model_name_or_path
    if base_path and Path(base_path).is_dir():
        wrapped.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    if cfg.vision == "frozen" and prefix is not None:  # peft froze it already; make it explicit
        tower = wrapped.get_base_model().get_submodule(prefix)
        tower.requires_grad_(False)
    return wrapped


def prepare_trainable(
    model: nn.Module, cfg: ModelConfig, *, is_vlm: bool, reference: bool
) -> tuple[nn.Module, nn.Module | None]:
    """``(model to train, frozen reference or None)`` as ``model.*`` asks: gradient checkpointing;
    LoRA adapters on the language model (the reference is then the model with adapters disabled,
    so no copy), or full fine-tuning with the vision tower frozen by ``freeze_vision`` and a frozen
    copy as the reference when ``reference``."""
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if cfg.lora is not None:
        return cast_frozen(apply_lora(model, cfg.lora, is_vlm=is_vlm), cfg.frozen_dtype), None
    if cfg.freeze_vision:
        freeze_vision_tower(model, is_vlm=is_vlm)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if reference else None
    return cast_frozen(model, cfg.frozen_dtype), (cast_frozen(ref, cfg.frozen_dtype) if ref is not None else None)


def cast_frozen(model: nn.Module, dtype_name: str) -> nn.Module:
    """Cast the floating-point parameters with ``requires_grad`` False to ``dtype_name`` ("fp32":
    unchanged, "bf16"); trained parameters stay as they are. Returns ``model``."""
    if dtype_name == "fp32":
        return model
    dtype = {"bf16": torch.bfloat16}[dtype_name]
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def freeze_vision_tower(model: nn.Module, *, is_vlm: bool) -> int:
    """Set requires_grad False on every vision-tower weight (full fine-tuning); returns their count."""
    prefix = vision_tower_prefix(model) if is_vlm else None
    _check_vlm(is_vlm, prefix, "model.freeze_vision", True)
    assert prefix is not None
    params = list(model.get_submodule(prefix).parameters())
    for p in params:
        p.requires_grad_(False)
    return len(params)


def _param_dtype(model: nn.Module, state_dict: dict[str, torch.Tensor] | None) -> torch.dtype:
    for t in (state_dict or {}).values():
        if torch.is_tensor(t) and t.is_floating_point():
            return t.dtype
    return next(model.parameters()).dtype


def save_lora(
    model: Any,
    folder: str | Path,
    processor: Any,
    *,
    merged: bool,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter (+ processor) into ``folder`` and, if ``merged``, ``folder/merged/``.

    model: the training ``PeftModel`` (left unchanged). state_dict: its full state dict when the
    parameters are partitioned (ZeRO-3: ``Engine.save_pretrained`` passes the consolidated one
    to its ``save_fn``); None uses ``model.state_dict()``. Call on the main rank only.
    ``folder`` then holds ``adapter_config.json``, ``adapter_model.safetensors`` and the
    processor files; ``folder/merged`` a full ``save_pretrained`` model + processor in the
    dtype of the trained weights. An older ``merged/`` is removed first, so merged weights
    are never older than the adapter next to them. Returns ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merged_dir = folder / MERGED_DIR
    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    model.save_pretrained(folder, state_dict=state_dict)
    if processor is not None:
        processor.save_pretrained(folder)
    if merged:
        merge_adapter(folder, merged_dir, dtype=_param_dtype(model, state_dict))
    return folder


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Base (from the adapter's ``base_model_name_or_path``) + adapter, merged, saved to ``out_dir``.

    Runs on CPU; written to ``out_dir.tmp`` and renamed, so ``out_dir`` is complete or absent.
    """
    from mmpo.models import load_adapter, quiet_hf_progress

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model, processor, _ = load_adapter(adapter_dir, dtype=dtype, device="cpu")
    with quiet_hf_progress():
        model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
