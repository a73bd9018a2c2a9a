"""The single model-loading path: a local save_pretrained folder, a Hub id in the local
Hugging Face cache (``org/name``, :mod:`mmpo.hub`; never downloaded) or ``tiny:<kind>``.

``load_model(path)`` reads ``config.json`` and picks the Auto classes:

- a VLM (``vision_config`` in the config, or a model type of the image-text-to-text mapping)
  -> ``AutoModelForImageTextToText`` + ``AutoProcessor``;
- otherwise a text LM -> ``AutoModelForCausalLM`` + ``AutoTokenizer``.

``tiny:<kind>`` first writes the tiny model (`mmpo.tiny.save_tiny`) into a cache folder, then
loads it through exactly the same ``from_pretrained`` calls. Nothing downloads
(``local_files_only=True`` everywhere).

A LoRA adapter folder (``adapter_config.json``, no ``config.json``; what `mmpo.lora.save_lora`
writes to a run's ``model/``) loads its ``merged/`` sub-folder when there is one, otherwise the
base named by ``base_model_name_or_path`` with the adapter applied and merged (`load_adapter`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from mmpo.adapters import MERGED_DIR, read_adapter_config
from mmpo.errors import ConfigError
from mmpo.hf_logging import quiet_hf_progress  # noqa: F401  (re-exported)
from mmpo.hub import is_hub_id, local_model_folder
from mmpo.special_tokens import special_token_ids

TINY_PREFIX = "tiny:"


@dataclasses.dataclass
class ModelInfo:
    """What the rest of mmpo needs to know about a loaded model.

    special_token_ids: ids never to sample nor score (mask their logits to -inf at sampling and
    in the training log-softmax): the tokenizer's special tokens that do not end generation,
    plus embedding rows past the tokenizer's vocabulary.
    """

    is_vlm: bool
    model_type: str
    eos_token_ids: list[int]
    pad_token_id: int
    special_token_ids: list[int]
    vocab_size: int  # width of the logits (model embedding rows), >= len(tokenizer)
    path: str  # the folder loaded (for a tiny model, its cache folder)

    @property
    def special(self) -> list[int]:
        """Alias of `special_token_ids`."""
        return self.special_token_ids


def tiny_cache_root() -> Path:
    """``$MMPO_CACHE/tiny`` or ``~/.cache/mmpo/tiny``."""
    base = os.environ.get("MMPO_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "mmpo"
    return root / "tiny"


def _tiny_folder(kind: str, seed: int, overrides: dict[str, Any], builder: Any) -> Path:
    """Cache folder named by kind, seed and a hash of the overrides and of the builder code.

    Hashing the source of mmpo.tiny and of the builder's module (and the transformers
    version) means an edited corpus or config never silently reuses a stale cached model.
    """
    import transformers

    h = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode())
    h.update(transformers.__version__.encode())
    for module_name in sorted({"mmpo.tiny", builder.__module__}):
        file = getattr(sys.modules.get(module_name), "__file__", None)
        if file:
            h.update(Path(file).read_bytes())
    return tiny_cache_root() / f"{kind}-seed{seed}-{h.hexdigest()[:12]}"


def write_cache_folder(folder: Path, marker: str, write: Callable[[Path], Any], what: str = "Tiny model") -> Path:
    """Run ``write(tmp)`` unless ``folder/marker`` exists, then rename ``tmp`` to `folder`.

    ``tmp`` is a fresh folder next to `folder`, so concurrent processes are safe: the first
    rename wins and the others discard their copy. A `folder` without `marker` (an interrupted
    write) raises a ConfigError asking to delete it.
    """
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / marker).is_file():  # not another process's finished copy
                raise ConfigError(
                    f"{what} cache folder '{folder}' exists without {marker} (an interrupted "
                    "write?); delete it and try again."
                ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_tiny(kind: str, seed: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """Write tiny model `kind` to its cache folder unless it is there; returns the folder.

    Written into a temporary folder next to it and renamed (`write_cache_folder`), so
    concurrent processes are safe: the first rename wins and the others discard their copy.
    """
    from mmpo.tiny import TINY_KINDS, save_tiny

    overrides = dict(overrides or {})
    builder = TINY_KINDS.get(kind)  # UnknownNameError (a ConfigError) lists the valid kinds
    folder = _tiny_folder(kind, seed, overrides, builder)
    return write_cache_folder(folder, "config.json", lambda tmp: save_tiny(kind, tmp, seed=seed, **overrides))


def _read_config(folder: Path, shown: str) -> dict[str, Any]:
    if not folder.exists():
        raise ConfigError(
            f"Model path '{shown}' does not exist (expected a local save_pretrained folder, a Hub id org/name "
            "in the local Hugging Face cache, or tiny:<kind>)."
        )
    if not folder.is_dir():
        raise ConfigError(f"Model path '{shown}' is a file; expected a save_pretrained folder.")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"Model folder '{shown}' has no config.json (not a save_pretrained folder).")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"Model config '{config_file}' is not valid JSON: {e}") from None


def is_vlm_config(config: dict[str, Any]) -> bool:
    """True for an image-text-to-text model (by ``vision_config`` or model_type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return "vision_config" in config or config.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in (x if isinstance(x, (list, tuple)) else [x])]


def _model_info(model: Any, tokenizer: Any, is_vlm: bool, model_type: str, folder: Path) -> ModelInfo:
    gen = getattr(model, "generation_config", None)
    eos: list[int] = []
    for i in _as_list(tokenizer.eos_token_id) + _as_list(getattr(gen, "eos_token_id", None)):
        if i not in eos:
            eos.append(i)
    if not eos:
        raise ConfigError(f"Model folder '{folder}' defines no eos token (tokenizer nor generation_config).")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = eos[0]
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    special = set(special_token_ids(tokenizer)) - set(eos)
    special.update(range(len(tokenizer), vocab_size))  # padded embedding rows no token maps to
    return ModelInfo(
        is_vlm=is_vlm,
        model_type=model_type,
        eos_token_ids=eos,
        pad_token_id=int(pad),
        special_token_ids=sorted(special),
        vocab_size=vocab_size,
        path=str(folder),
    )


def load_model(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tiny_overrides: dict[str, Any] | None = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any, ModelInfo]:
    """Load ``(model, processor_or_tokenizer, info)`` from a local folder, a cached Hub id or ``tiny:<kind>``.

    path: a save_pretrained folder; a Hub id ``org/name`` already in the local Hugging Face cache
      (its snapshot folder, `mmpo.hub.local_model_folder`; ConfigError naming ``hf download`` when
      absent); or ``tiny:<kind>`` (kinds: `mmpo.tiny.TINY_KINDS`), which
      is written once to a cache folder (`tiny_cache_root`) for `seed` and `tiny_overrides`, or
      a LoRA adapter folder (its ``merged/`` when present, else base + adapter: `load_adapter`).
    Returns the model in eval mode on `device` in `dtype`; a processor for VLMs, a tokenizer
    for text LMs. Raises ConfigError for a missing folder, a folder without config.json or an
    unknown tiny kind.
    """
    path = str(path)
    if path.startswith(TINY_PREFIX):
        folder = ensure_tiny(path[len(TINY_PREFIX) :], seed=seed, overrides=tiny_overrides)
    else:
        if tiny_overrides:
            raise ConfigError(f"tiny_overrides only apply to tiny:<kind> models, not to '{path}'.")
        folder = local_model_folder(path)
        if is_adapter_folder(folder):
            if not (folder / MERGED_DIR / "config.json").is_file():
                return load_adapter(folder, dtype=dtype, device=device, attn_implementation=attn_implementation)
            folder = folder / MERGED_DIR
            path = str(folder)
    config = _read_config(folder, path)
    model_type = str(config.get("model_type", ""))
    vlm = is_vlm_config(config)

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    model_cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    proc_cls = AutoProcessor if vlm else AutoTokenizer
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with quiet_hf_progress():
            model = model_cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **extra)
            proc = proc_cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"Cannot load model folder '{path}' ({model_type or 'no model_type'}): {e}") from e
    model.to(device)
    model.eval()
    tokenizer = getattr(proc, "tokenizer", proc)
    return model, proc, _model_info(model, tokenizer, vlm, model_type, folder)


def is_adapter_folder(folder: Path) -> bool:
    """A peft adapter folder: ``adapter_config.json`` and no ``config.json`` of its own."""
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def load_adapter(
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[Any, Any, ModelInfo]:
    """``(model, processor_or_tokenizer, info)``: the adapter's base with the adapter merged in.

    The base is the folder named by ``base_model_name_or_path`` in ``adapter_config.json``, or
    that Hub id's snapshot in the local cache (loaded with `load_model`);
    ``peft.PeftModel.from_pretrained`` applies the adapter and ``merge_and_unload`` returns a
    plain transformers model (eval mode, on `device`). The processor comes from the adapter
    folder when it holds one, else from the base. ``info.path`` is the adapter folder. Raises
    ConfigError when the base folder is missing.
    """
    import peft

    folder = Path(folder).expanduser()
    acfg = read_adapter_config(folder)
    base = acfg.get("base_model_name_or_path")
    if base and is_hub_id(str(base)):  # a local folder of that name wins (local_model_folder)
        base = str(local_model_folder(str(base), what=f"base_model_name_or_path of {folder / 'adapter_config.json'}"))
    if not base or not Path(str(base)).expanduser().is_dir():
        raise ConfigError(
            f"LoRA adapter '{folder}' needs its base model '{base}' (base_model_name_or_path in "
            f"{folder / 'adapter_config.json'}), and that folder does not exist. Put the base "
            "model there (for tiny models: load the same tiny:<kind> with the same seed and "
            "overrides once), edit base_model_name_or_path, or load the run's model/merged/ folder."
        )
    model, proc, info = load_model(str(base), dtype=dtype, device=device, attn_implementation=attn_implementation)
    try:
        with quiet_hf_progress():
            model = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"Cannot apply LoRA adapter '{folder}' to base '{base}': {e}") from e
    model = model.merge_and_unload()
    model.to(device=device, dtype=dtype)
    model.eval()
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoProcessor, AutoTokenizer

        proc_cls = AutoProcessor if info.is_vlm else AutoTokenizer
        with quiet_hf_progress():
            proc = proc_cls.from_pretrained(str(folder), local_files_only=True)
    return model, proc, dataclasses.replace(info, path=str(folder))


def mark_checkpointed_layers(model: torch.nn.Module) -> int:
    """Let gradient checkpointing act on a model kept in eval mode; returns the layers marked.

    transformers checkpoints a layer only when ``layer.training`` is set, but the trainer keeps
    the model in eval mode (no dropout, so sampled and trained log-probs agree). Setting the flag
    on the checkpointed layers alone (not their children) turns recomputation on without
    touching dropout. Generation's ``model.eval()`` clears it again, so call this before each update.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    marked = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False):
            module.training = True
            marked += 1
    return marked
