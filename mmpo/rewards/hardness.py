"""Data hardness of a prompt: how far it lies from its anchor under a frozen text encoder (DR-IRL, arXiv 2503.18991).

DR-IRL scales GRPO's advantages by task difficulty, one part being *data-level hardness*
measured by text-encoder cosine similarity (``docs/algorithms.md``, DR-IRL GRPO-S scaling). The
paper gives no formula; this library uses::

    h_d(x) = (1 - cos(E(x), E(a(x)))) / 2  in [0, 1]

with E a frozen text encoder and a(x) the prompt's anchor (its demonstration). A prompt without
an anchor has h_d = 0 (no scaling). Encoders (:data:`TEXT_ENCODERS`, built by
:func:`build_text_encoder`):

- ``hashed``: :class:`HashedTextEncoder`, signed feature hashing of word unigrams and character
  trigrams; deterministic, no model. Its features and hashing are those of ScreenExplorer's text
  embedding in the ``gui_agent`` plugin (the same vectors for the same ``dim``).
- ``clip``: :class:`ClipTextEncoder`, the text tower of an open_clip model read from local files
  (loaded as :class:`mmpo.rewards.clip_score.ClipScore` loads it; nothing is downloaded).

:class:`HardnessCache` computes each prompt's hardness once (keyed by prompt id) and saves it in
checkpoints (``state_dict`` / ``load_state_dict``, JSON-serialisable).
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mmpo.core.registry import Registry, did_you_mean
from mmpo.errors import ConfigError

#: a text encoder: B texts -> [B, D] float32 (rows need not be normalised)
TextEncoder = Callable[[Sequence[str]], torch.Tensor]

_WORD_RE = re.compile(r"\w+")


class HashedTextEncoder:
    """Text -> ``[dim]`` float32 by signed feature hashing, L2-normalised (zero for a text with no feature).

    Features (:meth:`features`): ``"w:" + word`` for each lowercased word (``\\w+``) and
    ``"c:" + n-gram`` for each character n-gram (``char_ngram``, default 3) of the lowercased,
    whitespace-collapsed text padded with one space on each side. Each feature adds ``sign`` at
    ``index`` (:meth:`bucket`): ``h = crc32(utf-8 bytes)``, ``index = h % dim``, ``sign = +1`` if
    bit 31 of ``h`` is 0 else -1. Stable across processes and machines.
    """

    def __init__(self, dim: int = 512, char_ngram: int = 3) -> None:
        for option, value in (("dim", dim), ("char_ngram", char_ngram)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"text encoder 'hashed': option {option!r} = {value!r}: must be an integer >= 1")
        self.dim = dim
        self.char_ngram = char_ngram

    def features(self, text: str) -> list[str]:
        """The hashed features of ``text``, with repeats (counts are the weights)."""
        low = text.lower()
        words = ["w:" + w for w in _WORD_RE.findall(low)]
        flat = " ".join(low.split())
        if not flat:
            return words
        padded = f" {flat} "
        n = self.char_ngram
        return words + ["c:" + padded[i : i + n] for i in range(len(padded) - n + 1)]

    def bucket(self, feature: str) -> tuple[int, float]:
        """``(index, sign)`` of one feature."""
        h = zlib.crc32(feature.encode("utf-8"))
        return h % self.dim, (1.0 if h & 0x80000000 == 0 else -1.0)

    def embed_one(self, text: str) -> torch.Tensor:
        """``text`` -> ``[dim]`` float32, unit norm or zero."""
        v = np.zeros(self.dim, dtype=np.float64)
        for f in self.features(text):
            i, s = self.bucket(f)
            v[i] += s
        n = float(np.linalg.norm(v))
        if n > 0:  # counts are integers: a zero norm is exact
            v /= n
        return torch.from_numpy(v).float()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``B`` texts -> ``[B, dim]`` float32."""
        if len(texts) == 0:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        return torch.stack([self.embed_one(t) for t in texts])

    __call__ = embed


class ClipTextEncoder:
    """The text tower of a local open_clip model: ``B`` texts -> ``[B, D]`` unit vectors, float32 on CPU.

    Options as :class:`mmpo.rewards.clip_score.ClipScore` (validated by it): ``model`` (an
    open_clip architecture name, a model config JSON or ``local-dir:<folder>``), ``weights`` (a
    local .safetensors / .pt file), ``tag`` (open_clip pretrained tag, metadata only),
    ``batch_size`` (32), ``device`` (default CPU). The model is loaded on the first call;
    texts longer than the model's context are truncated by its tokenizer.
    """

    def __init__(
        self, model: str, weights: str, tag: str | None = None, batch_size: int = 32, device: str | None = None
    ) -> None:
        from mmpo.rewards.clip_score import ClipScore

        self._clip = ClipScore(model=model, weights=weights, tag=tag, batch_size=batch_size, device=device)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros(0, 0)
        clip = self._clip
        if clip._net is None:
            clip._load(torch.device(clip.device or "cpu"))
        dev, bs = next(clip._net.parameters()).device, clip.batch_size
        parts = [
            F.normalize(clip._net.encode_text(clip._tokenizer(texts[i : i + bs]).to(dev)).float(), dim=-1)
            for i in range(0, len(texts), bs)
        ]
        return torch.cat(parts).cpu()


TEXT_ENCODERS: Registry[Callable[..., TextEncoder]] = Registry("text encoder")
TEXT_ENCODERS.add("hashed", HashedTextEncoder)
TEXT_ENCODERS.add("clip", ClipTextEncoder)


def build_text_encoder(name: str, options: Mapping[str, Any] | None = None) -> TextEncoder:
    """The encoder ``name`` of :data:`TEXT_ENCODERS` with ``options``; ConfigError for an unknown
    encoder or option, or a bad value (naming it)."""
    import inspect

    cls = TEXT_ENCODERS.get(name)
    opts = dict(options or {})
    params = [p for p in inspect.signature(cls).parameters if p != "self"]
    for key in opts:
        if key not in params:
            why = f"{did_you_mean(str(key), params)} Valid: {', '.join(params)}"
            raise ConfigError(f"text encoder {name!r}: unknown option {key!r}.{why}")
    try:
        return cls(**opts)
    except TypeError as exc:
        raise ConfigError(f"text encoder {name!r}: {exc}") from None


def build_encoder(spec: str | Mapping[str, Any] | None = "hashed") -> TextEncoder:
    """The encoder of ``spec``: a name of :data:`TEXT_ENCODERS` or a mapping ``{"name": ...,
    <options>}`` (e.g. ``{"name": "clip", "model": ..., "weights": ...}``); None means ``hashed``."""
    if spec is None or isinstance(spec, str):
        return build_text_encoder(spec or "hashed")
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        return build_text_encoder(spec["name"], {k: v for k, v in spec.items() if k != "name"})
    raise ConfigError(
        f"text encoder: expected a name or a mapping {{name: <{' | '.join(TEXT_ENCODERS.names())}>, <options>}}, "
        f"got {spec!r}"
    )


def data_hardness(
    prompt_texts: Sequence[str], anchor_texts: Sequence[str | None], encoder: TextEncoder | str
) -> torch.Tensor:
    """``h [n] = (1 - cos(E(prompt), E(anchor))) / 2`` float32 in [0, 1]; 0 where the anchor is None.

    ``encoder``: a text encoder (texts -> ``[B, D]``) or the name of one in :data:`TEXT_ENCODERS`
    (default options). A zero embedding (an empty text under ``hashed``) has cosine 0 with
    anything, so hardness 0.5.
    """
    if len(prompt_texts) != len(anchor_texts):
        raise ValueError(f"data_hardness: {len(prompt_texts)} prompts but {len(anchor_texts)} anchors")
    enc = build_text_encoder(encoder) if isinstance(encoder, str) else encoder
    out = torch.zeros(len(prompt_texts), dtype=torch.float32)
    rows = [i for i, a in enumerate(anchor_texts) if a is not None]
    if not rows:
        return out
    x = enc([prompt_texts[i] for i in rows]).float()
    a = enc([str(anchor_texts[i]) for i in rows]).float()
    cos = F.cosine_similarity(x, a, dim=-1, eps=1e-12).cpu()
    out[rows] = ((1.0 - cos) / 2.0).clamp(0.0, 1.0)
    return out


class HardnessCache:
    """Each prompt's data hardness, computed once and kept by prompt id (checkpointed).

    ``cache(ids, prompt_texts, anchor_texts) -> [n]`` encodes only the prompts it has not seen;
    ``values`` maps prompt id -> hardness, also read and written as ``cache[id]`` / ``id in cache``.
    ``state_dict()`` is ``{"values": {id: float}}``.
    """

    def __init__(self, encoder: TextEncoder | str | Mapping[str, Any] = "hashed") -> None:
        self.encoder = encoder if callable(encoder) else build_encoder(encoder)
        self.values: dict[str, float] = {}

    def __contains__(self, key: object) -> bool:
        return str(key) in self.values

    def __getitem__(self, key: str) -> float:
        return self.values[str(key)]

    def __setitem__(self, key: str, value: float) -> None:
        self.values[str(key)] = float(value)

    def __len__(self) -> int:
        return len(self.values)

    def __call__(
        self, ids: Sequence[str], prompt_texts: Sequence[str], anchor_texts: Sequence[str | None]
    ) -> torch.Tensor:
        if not (len(ids) == len(prompt_texts) == len(anchor_texts)):
            raise ValueError(f"{len(ids)} ids, {len(prompt_texts)} prompts and {len(anchor_texts)} anchors differ")
        todo: dict[str, int] = {}
        for i, key in enumerate(ids):
            if str(key) not in self.values and str(key) not in todo:
                todo[str(key)] = i
        if todo:
            idx = list(todo.values())
            h = data_hardness([prompt_texts[i] for i in idx], [anchor_texts[i] for i in idx], self.encoder)
            self.values.update(zip(todo, h.tolist()))
        return torch.tensor([self.values[str(k)] for k in ids], dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"values": dict(self.values)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = state.get("values", {})
        bad = [k for k, v in values.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"hardness cache state: non-numeric values for prompt ids {bad[:3]}")
        self.values = {str(k): float(v) for k, v in values.items()}


__all__ = [
    "TextEncoder",
    "HashedTextEncoder",
    "ClipTextEncoder",
    "TEXT_ENCODERS",
    "build_text_encoder",
    "build_encoder",
    "data_hardness",
    "HardnessCache",
]
