"""``clip_score``: CLIP image-text cosine similarity through open_clip, from LOCAL weights only.

Nothing is downloaded: the architecture comes from open_clip's bundled configs (``model:
ViT-B-32``) or from a local JSON config, the weights from a local ``.safetensors`` (preferred)
or ``.pt`` / ``.pth`` / ``.bin`` file read with ``torch.load(weights_only=True)``. open_clip is
imported on first use (it pulls in timm and transformers, a few seconds).

A config JSON is either a bare model config ``{"embed_dim", "vision_cfg", "text_cfg"}``,
registered with ``open_clip.add_model_config`` under its file stem (which must not shadow a
different bundled config), or an HF-style ``open_clip_config.json`` with ``model_cfg`` (and
``preprocess_cfg``), loaded through open_clip's ``local-dir:`` schema of its folder.

With ``pretrained=None`` open_clip knows nothing of how the weights were trained, so pass
``tag`` (an open_clip pretrained tag such as ``openai`` or ``laion2b_s34b_b79k``; metadata only,
no download) to get that tag's QuickGELU setting and image mean/std/resize mode. OpenAI's
weights without ``tag: openai`` (or the ``-quickgelu`` architecture) load without error but give
wrong features.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from mmpo.core.registry import did_you_mean
from mmpo.rewards.image_component import (
    IMAGE_REWARDS,
    ImageReward,
    Metas,
    OptionError,
    check_batch,
    float_option,
    int_option,
    str_option,
)

TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


class _DropRandomInitWarning(logging.Filter):
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" (we load them next)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights_only), unwrapping ``state_dict`` / ``module.``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise OptionError("weights", f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(sd, Mapping) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd:
        raise OptionError("weights", f"{path} holds no state dict (got {type(sd).__name__})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def preprocess(images: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    """images [n, 3, H, W] in [0, 1] -> normalised pixels [n, 3, S_h, S_w] per an open_clip preprocess cfg.

    ``resize_mode`` ``shortest`` (default: shorter side to S, centre crop, as open_clip's
    Resize + CenterCrop), ``squash`` (resize to S x S) or ``longest`` (longer side to S, centre
    pad with ``fill_color``); bicubic/bilinear with antialias, clamped to [0, 1]; then
    ``(x - mean) / std``.
    """
    size = cfg.get("size", 224)
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    interp = cfg.get("interpolation", "bicubic")
    interp = interp if interp in ("bicubic", "bilinear") else "bicubic"
    mode = cfg.get("resize_mode", "shortest")
    x = images.clamp(0, 1)
    h, w = x.shape[-2:]
    if mode == "squash":
        x = _resize(x, (th, tw), interp)
    elif mode == "longest":
        s = min(th / h, tw / w)
        nh, nw = min(th, max(1, round(h * s))), min(tw, max(1, round(w * s)))
        x = _resize(x, (nh, nw), interp)
        top, left = (th - nh) // 2, (tw - nw) // 2
        x = F.pad(x, (left, tw - nw - left, top, th - nh - top), value=float(cfg.get("fill_color", 0)) / 255)
    else:
        s = max(th / h, tw / w)
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        x = _resize(x, (nh, nw), interp)
        top, left = int(round((nh - th) / 2)), int(round((nw - tw) / 2))
        x = x[..., top : top + th, left : left + tw]
    x = x.clamp(0, 1)
    mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), dtype=x.dtype, device=x.device)
    std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), dtype=x.dtype, device=x.device)
    return (x - mean[:, None, None]) / std[:, None, None]


@IMAGE_REWARDS.register("clip_score")
@dataclass
class ClipScore(ImageReward):
    """``scale * cos(image_features, text_features)`` of an open_clip model (raw cosine by default).

    Options: ``model`` (open_clip architecture name such as ``ViT-B-32``, a path to a model
    config JSON, or ``local-dir:<folder>``), ``weights`` (local .safetensors/.pt/.pth/.bin, must
    exist), ``tag`` (open_clip pretrained tag whose QuickGELU and preprocessing to use; no
    download), ``batch_size`` (images / prompts per forward, default 32), ``scale`` (multiplier,
    default 1.0 = raw cosine in [-1, 1]; 2.5 is CLIPScore's ``w * cos`` of Hessel et al. 2021,
    without its ``max(., 0)``; 100 the usual "x100" form), ``device`` (default: the images'
    device). Identical prompts in a batch are encoded once. The model is built on the first call
    and cached on the instance; gradients are off.
    """

    model: str
    weights: str
    tag: str | None = None
    batch_size: int = 32
    scale: float = 1.0
    device: str | None = None
    _net: Any = field(default=None, init=False, repr=False, compare=False)
    _tokenizer: Any = field(default=None, init=False, repr=False, compare=False)
    _pp: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        str_option(self.model, "model")
        str_option(self.weights, "weights")
        if self.model.startswith("hf-hub:"):
            raise OptionError("model", f"{self.model!r} would download from the Hugging Face Hub; give a local config")
        if self.model.endswith(".json") and not Path(self.model).is_file():
            raise OptionError("model", f"config file not found: {self.model}")
        if not Path(self.weights).is_file():
            raise OptionError("weights", f"file not found: {self.weights}")
        self.tag = str_option(self.tag, "tag", optional=True)
        self.batch_size = int_option(self.batch_size, "batch_size")
        self.scale = float_option(self.scale, "scale")
        self.device = str_option(self.device, "device", optional=True)

    def _arch(self, open_clip: Any) -> str:
        """The open_clip model identifier for ``model`` (registering a bare config file)."""
        if self.model.startswith("local-dir:"):
            if not Path(self.model[len("local-dir:") :]).is_dir():
                raise OptionError("model", f"folder not found: {self.model}")
            return self.model
        path = Path(self.model)
        if not (self.model.endswith(".json") or path.is_file()):
            names = open_clip.list_models()
            if self.model not in names:
                raise OptionError(
                    "model",
                    f"unknown open_clip architecture {self.model!r}.{did_you_mean(self.model, names)} "
                    "Give a name of open_clip.list_models() or a path to a model config JSON",
                )
            return self.model
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OptionError("model", f"cannot read the model config {path}: {exc}") from None
        if isinstance(cfg, dict) and "model_cfg" in cfg:
            if path.name != "open_clip_config.json":
                why = "has 'model_cfg': name it open_clip_config.json (open_clip's local-dir layout)"
                raise OptionError("model", f"{path} {why}")
            return f"local-dir:{path.parent}"
        if not (isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg"))):
            raise OptionError("model", f"{path} is no open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        known = open_clip.get_model_config(path.stem)
        if known is None:
            open_clip.add_model_config(path)
        elif known != cfg:
            why = f"open_clip already has a different config named {path.stem!r}; rename the file"
            raise OptionError("model", f"{path}: {why}")
        return path.stem

    def _load(self, device: torch.device) -> None:
        import open_clip

        arch = self._arch(open_clip)
        kwargs: dict[str, Any] = {
            "pretrained": None,
            "load_weights": False,
            "pretrained_image": False,
            "pretrained_text": False,
        }
        if self.tag is not None:
            tag_cfg = open_clip.pretrained.get_pretrained_cfg(arch, self.tag)
            if not tag_cfg:
                known = open_clip.list_pretrained_tags_by_model(arch)
                why = f"{self.tag!r} is no open_clip pretrained tag of {arch!r}; known: {', '.join(known) or 'none'}"
                raise OptionError("tag", why)
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            keys = ("mean", "std", "interpolation", "resize_mode")
            kwargs["force_preprocess_cfg"] = {k: tag_cfg[k] for k in keys if k in tag_cfg}
        quiet = _DropRandomInitWarning()
        logging.getLogger().addFilter(quiet)
        try:
            net = open_clip.create_model(arch, **kwargs)
        finally:
            logging.getLogger().removeFilter(quiet)
        sd = _load_state_dict(Path(self.weights))
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            why = f"{self.weights} does not fit model {self.model!r}: {str(exc)[:600]}"
            raise OptionError("weights", why) from None
        self._net = net.eval().requires_grad_(False).to(device)
        self._tokenizer = open_clip.get_tokenizer(arch)
        self._pp = dict(open_clip.get_model_preprocess_cfg(net))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metas: Metas) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1], N prompts -> ``scale * cosine`` [N] float32 on the images' device."""
        check_batch(images, prompts, metas)
        if self._net is None:
            self._load(torch.device(self.device) if self.device else images.device)
        dev, bs = next(self._net.parameters()).device, self.batch_size
        unique = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # prompt -> row of `text`
        order = list(unique)
        text = torch.cat(
            [
                F.normalize(self._net.encode_text(self._tokenizer(order[i : i + bs]).to(dev)).float(), dim=-1)
                for i in range(0, len(order), bs)
            ]
        )
        pixels = images.to(dev, torch.float32)
        image = torch.cat(
            [
                F.normalize(self._net.encode_image(preprocess(pixels[i : i + bs], self._pp)).float(), dim=-1)
                for i in range(0, len(pixels), bs)
            ]
        )
        row = torch.tensor([unique[p] for p in prompts], device=dev)
        cos = (image * text[row]).sum(dim=-1)
        return (self.scale * cos).float().to(images.device)


def build_tiny_clip(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny random open_clip model for tests and demos -> (config JSON path, safetensors path).

    ``folder/tiny_clip.json`` holds :data:`TINY_CLIP_CONFIG` (embed 32; ViT 32 px, patch 8, width
    32, 2 layers; text context 77, vocab 49408 (open_clip's bundled BPE), width 32, 2 heads, 2
    layers); ``folder/tiny_clip.safetensors`` its weights, initialised by ``open_clip.CLIP`` under
    ``torch.manual_seed(seed)`` (the global RNG is left untouched). Use as
    ``clip_score(model=<json>, weights=<safetensors>)``; nothing is downloaded.
    """
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path, weights_path = folder / "tiny_clip.json", folder / "tiny_clip.safetensors"
    cfg_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2), encoding="utf-8")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = open_clip.CLIP(**copy.deepcopy(TINY_CLIP_CONFIG))
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(weights_path))
    return cfg_path, weights_path


__all__ = ["TINY_CLIP_CONFIG", "ClipScore", "build_tiny_clip", "preprocess"]
