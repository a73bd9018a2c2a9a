"""LoRA adapters of a diffusers denoiser, saved the way diffusers loads them."""

from __future__ import annotations

from pathlib import Path

import torch


def save_merged_pipeline(base_folder: str | Path, lora_folder: str | Path, out_folder: str | Path) -> Path:
    """Open the base pipeline, load the adapter of ``lora_folder`` with ``load_lora_weights``, fuse
    it into the weights and save a plain pipeline to ``out_folder`` (loads without peft)."""
    from diffusers import DiffusionPipeline

    from mmpo.diffusion.pipeline import quiet_loading

    with quiet_loading():
        pipe = DiffusionPipeline.from_pretrained(str(base_folder), local_files_only=True, dtype=torch.float32)
        pipe.load_lora_weights(str(lora_folder))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        pipe.save_pretrained(str(out_folder), safe_serialization=True)
    return Path(out_folder)


__all__ = ["save_merged_pipeline"]
