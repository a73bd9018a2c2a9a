"""ARES / AEPO entropy-shaped reward pieces (code shawn0728/ARES).

Pure torch / python, no model. One training step uses them in this order (as the ARES code):

1. rollout gives per-token entropies ``H [N, T]``, the response ``mask [N, T]`` and the text of
   each generated token (ARES: the arg-max token of the top-k log-probs; the sampled token is the
   usual stand-in);
2. ``hwe, soft_cost, invalid = hwe_count(H, mask, texts, threshold.tau)`` -- counted with the
   threshold of the *previous* step; then ``threshold.update(window_percentiles(H, mask))``;
3. ``buckets = difficulty_buckets(correct, group_ids)``;
4. ``r_H = aepo_entropy_reward(correct, hwe, buckets, reward_state)`` (targets, alpha update, then
   :func:`hierarchical_entropy_reward`); the total reward is ``accuracy + r_H``;
5. the KL side (``mmpo.core.ares``) takes ``buckets``, ``correct`` and ``soft_cost``.

Windows: ``H_bar[t]`` is the mean entropy of the ``w`` tokens *after* t (``t+1 .. t+w``, ARES code;
``include_current=True`` gives the paper's ``t .. t+w-1``); only complete windows count.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable

import torch
from torch import Tensor

from mmpo.core.ares import BUCKETS, bucket_means, bucket_names
from mmpo.core.entropy import window_complete, window_entropy
from mmpo.errors import DataError

# ----------------------------------------------------------------------------- lexicon
TRIGGER_WORDS_FILE = Path(__file__).with_name("trigger_words.txt")


def load_trigger_words(path: str | Path = TRIGGER_WORDS_FILE) -> frozenset[str]:
    """Words of a lexicon file: one per line, lower-cased; blank lines and ``#`` comments skipped.

    Raises :class:`DataError` naming the file and line for an entry that is not one word (a
    token-level trigger can only match a single word) or for a file without words.
    """
    path = Path(path)
    words: set[str] = set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if any(ch.isspace() for ch in word):
            raise DataError(f"{path}:{lineno}: trigger entry '{word}' must be a single word")
        words.add(normalize_token(word))
    if not words:
        raise DataError(f"{path}: no trigger words found")
    return frozenset(words)


# BPE markers: sentencepiece space, byte-level BPE space / newline / tab
_MARKERS = "\u2581\u0120\u010a\u0109"
_PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2026\u2013\u2014\u00b7"
_STRIP_ALL = _MARKERS + string.whitespace + _PUNCT
_LEADING_MARKERS = re.compile("^[\u2581\u0120]+")


@functools.lru_cache(maxsize=65536)
def normalize_token(text: str, strip_punctuation: bool = True) -> str:
    """Token text as matched against the lexicon: lower-cased, stripped of BPE space markers
    (``▁ Ġ Ċ ĉ``), whitespace and (``strip_punctuation``) surrounding punctuation.

    ``strip_punctuation=False`` is ARES's ``normalize_token`` exactly: leading ``▁``/``Ġ``
    removed, then whitespace stripped, lower-cased (so ``"Wait,"`` would not match ``wait``).
    """
    if strip_punctuation:
        return text.strip(_STRIP_ALL).lower()
    return _LEADING_MARKERS.sub("", text).strip().lower()


TRIGGER_WORDS: frozenset[str] = load_trigger_words()
"""The default reasoning-trigger lexicon (``trigger_words.txt``, ~120 discourse words)."""


# ----------------------------------------------------------------------------- HWE threshold
def _check_entropy(token_entropy: Tensor, mask: Tensor) -> None:
    if token_entropy.dim() != 2 or token_entropy.shape != mask.shape:
        raise ValueError(f"token_entropy {tuple(token_entropy.shape)} and mask {tuple(mask.shape)} must both be [N, T]")


def window_percentiles(
    token_entropy: Tensor, mask: Tensor, window: int = 4, q: float = 95.0, *, include_current: bool = False
) -> Tensor:
    """Per-response ``q``-th percentile of window-mean entropies: ``[N, T], [N, T] -> [N]`` (float32).

    As ARES's ``get_window_average_entropy_percentile_threshold_list``: every valid token
    contributes one value -- its complete window's mean, or, for a token without a complete
    window, the mean of the complete windows' means (the entropy of the first token when the
    response has no complete window). Percentile with linear interpolation (``np.percentile``).
    An empty response gives 0.
    """
    _check_entropy(token_entropy, mask)
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    h = token_entropy.detach().to(torch.float32)
    means = window_entropy(h, mask, window, include_current).to(torch.float64)
    complete = window_complete(mask, window, include_current)
    valid = mask.bool()
    out = torch.zeros(h.shape[0], dtype=torch.float64)
    for i in range(h.shape[0]):
        n_valid = int(valid[i].sum())
        if n_valid == 0:
            continue
        full = means[i][complete[i]].cpu()
        fill = full.mean() if full.numel() else h[i][valid[i]][0].cpu().to(torch.float64)
        values = torch.cat([full, fill.reshape(1).expand(n_valid - full.numel())])
        out[i] = float(torch.quantile(values, q / 100.0))
    return out.to(device=token_entropy.device, dtype=torch.float32)


@dataclass
class HWEThreshold:
    """The high-window-entropy threshold ``tau_H``, an EMA of batch medians of per-response percentiles.

    ``tau`` starts at the given value (validation pass, e.g. the mean of its
    :func:`window_percentiles`; ARES falls back to 1.5). :meth:`update` with a batch's
    percentiles: ``tau <- momentum * tau + (1 - momentum) * median`` (0.99 / 0.01). ARES's EMA
    is *seeded* by the first training batch's median (the initial value only serves the first
    step's count): ``seed_from_first_batch=True`` (default); ``False`` runs the EMA from the
    initial value.
    """

    tau: float = 1.5
    momentum: float = 0.99
    seed_from_first_batch: bool = True
    updates: int = 0

    def update(self, percentiles: Tensor | Sequence[float]) -> float:
        """Fold one batch's per-response percentiles ``[N]`` into ``tau``; returns the new ``tau``."""
        p = torch.as_tensor(percentiles, dtype=torch.float64).detach().cpu().reshape(-1)
        if p.numel() == 0:
            return self.tau
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"HWEThreshold.update: percentiles must be finite, got {p.tolist()}")
        median = float(torch.quantile(p, 0.5))  # averages the middle pair, as np.median
        if self.updates == 0 and self.seed_from_first_batch:
            self.tau = median
        else:
            self.tau = self.momentum * self.tau + (1.0 - self.momentum) * median
        self.updates += 1
        return self.tau

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "updates": self.updates}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.tau = float(d["tau"])
        self.updates = int(d.get("updates", 0))


# ----------------------------------------------------------------------------- HWE count
def hwe_count(
    token_entropy: Tensor,
    mask: Tensor,
    token_texts: Sequence[Sequence[str]],
    tau: float,
    window: int = 4,
    *,
    lexicon: frozenset[str] | set[str] | None = None,
    include_current: bool = False,
    strip_punctuation: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """High-window-entropy (HWE) trigger count per response (ARES ``compute_reasoning_token_window_entropy``).

    ``token_entropy [N, T]``, ``mask [N, T]``, ``token_texts``: N lists of token strings aligned
    with the columns (a row may be shorter than T, but must cover every masked position).
    Trigger positions: valid tokens whose :func:`normalize_token` text is in ``lexicon``
    (default :data:`TRIGGER_WORDS`) and whose window ``t+1 .. t+window`` (``include_current``:
    ``t .. t+window-1``) is complete. With ``H_bar`` the window mean entropy:

    - ``count [N]`` (long): triggers with ``H_bar >= tau``;
    - ``soft_cost [N]`` (float32): ``sum over triggers of max(0, H_bar - tau)``;
    - ``invalid [N]`` (long): triggers with ``H_bar < tau``.
    """
    _check_entropy(token_entropy, mask)
    n, t_len = mask.shape
    if len(token_texts) != n:
        raise ValueError(f"token_texts has {len(token_texts)} rows, token_entropy has {n}")
    lex = TRIGGER_WORDS if lexicon is None else frozenset(lexicon)
    valid = mask.bool().cpu()
    trig = torch.zeros(n, t_len, dtype=torch.bool)
    for i, row in enumerate(token_texts):
        if len(row) > t_len:
            raise ValueError(f"token_texts row {i} has {len(row)} tokens, more than T = {t_len}")
        if bool(valid[i, len(row) :].any()):
            raise ValueError(f"token_texts row {i} has {len(row)} tokens but the mask has valid positions beyond")
        for t, text in enumerate(row):
            if normalize_token(text, strip_punctuation) in lex:
                trig[i, t] = True
    device = token_entropy.device
    trig = trig.to(device) & window_complete(mask, window, include_current)
    h_bar = window_entropy(token_entropy.detach(), mask, window, include_current)
    above = h_bar >= tau
    count = (trig & above).sum(-1)
    invalid = (trig & ~above).sum(-1)
    excess = (h_bar - tau).clamp_min(0.0)
    soft_cost = torch.where(trig, excess, torch.zeros_like(excess)).sum(-1)
    return count, soft_cost, invalid


# ----------------------------------------------------------------------------- difficulty
def difficulty_buckets(correct: Tensor, group_ids: Tensor | Sequence[Hashable]) -> list[str]:
    """Difficulty bucket of every sample from its group's accuracy: ``correct [N], group_ids [N] -> N names``.

    Group accuracy ``a`` = mean of ``correct`` (bool or 0/1) over the group's samples:
    ``a >= 2/3`` easy, ``a >= 1/3`` medium, else hard (compared exactly: ``3 sum >= 2 n``).
    """
    c = torch.as_tensor(correct).detach().to(torch.float64).cpu().reshape(-1)
    ids = group_ids.detach().cpu().tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(ids) != c.numel():
        raise ValueError(f"correct has {c.numel()} samples, group_ids {len(ids)}")
    sums: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    for g, v in zip(ids, c.tolist()):
        sums[g] = sums.get(g, 0.0) + v
        counts[g] = counts.get(g, 0) + 1
    bucket = {
        g: "easy" if 3 * sums[g] >= 2 * counts[g] else "medium" if 3 * sums[g] >= counts[g] else "hard" for g in sums
    }
    return [bucket[g] for g in ids]


# ----------------------------------------------------------------------------- reward
MARGIN_FRAC = {"easy": 0.15, "medium": 0.25, "hard": 0.35}
HUBER_KAPPA = {"easy": 2.0, "medium": 3.0, "hard": 4.0}
SIGMOID_TEMP = {"easy": 2.0, "medium": 2.5, "hard": 3.0}
CAP_SCALE = {"easy": 1.0, "medium": 1.0, "hard": 1.2}
WRONG_GAIN = {"easy": 0.6, "medium": 0.8, "hard": 1.0}
HARD_UNDER_SCALE = 0.5
VALIDATION_TARGET_COEF = {"easy": 0.35, "medium": 0.5, "hard": 0.65}


def huber(x: float, kappa: float) -> float:
    """``h(x) = x^2 / (2 kappa)`` for ``x <= kappa`` else ``x - kappa / 2``, with ``x`` clipped at 0."""
    x = max(float(x), 0.0)
    return 0.5 * x * x / kappa if x <= kappa else x - 0.5 * kappa


def sigmoid_t(x: float, temp: float) -> float:
    """``1 / (1 + exp(-x / temp))``."""
    return 1.0 / (1.0 + math.exp(-float(x) / max(float(temp), 1e-6)))


def margin(target: float, frac: float) -> float:
    """Tolerance band ``max(1, frac * max(target, 1))`` (= ``max(1, frac * target)`` for frac < 1)."""
    return max(1.0, frac * max(float(target), 1.0))


@dataclass
class AresRewardState:
    """Per-bucket state of the entropy reward: ``alpha`` (cap scale, init 0.5) and optional targets.

    ``targets=None`` (ARES code): each step's target is the batch's rounded bucket mean
    (:func:`bucket_targets`), so the alpha update's ``Delta = mean - round(mean)`` is at most
    0.5 -- alpha barely moves (a quirk of the code). Setting ``targets`` (e.g. from
    :func:`validation_targets` on a validation pass, or fixed numbers from the task options)
    keeps separate targets, which both the reward and :func:`update_alpha` then use, so the
    adaptation bites. ``lr`` 0.05, ``alpha`` kept in ``[alpha_min, alpha_max]`` = [0, 2].
    """

    alpha: dict[str, float] = field(default_factory=lambda: {b: 0.5 for b in BUCKETS})
    targets: dict[str, float] | None = None
    lr: float = 0.05
    alpha_min: float = 0.0
    alpha_max: float = 2.0

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": dict(self.alpha), "targets": None if self.targets is None else dict(self.targets)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.alpha = {b: float(d["alpha"][b]) for b in BUCKETS}
        t = d.get("targets")
        self.targets = None if t is None else {str(k): float(v) for k, v in t.items()}


def _as_values(hwe: Tensor | Sequence[float], n: int, name: str) -> list[float]:
    v = torch.as_tensor(hwe).detach().to(torch.float64).cpu().reshape(-1).tolist()
    if len(v) != n:
        raise ValueError(f"{name} has {len(v)} values, expected {n} (one per sample)")
    return v


def bucket_targets(hwe: Tensor | Sequence[float], buckets: Sequence[str] | Tensor) -> dict[str, int]:
    """``T_d = round(mean HWE count over the bucket's samples)`` for each bucket present.

    Python ``round`` (half to even, as the code's ``round(np.float64)``). ARES averages the
    per-prompt mean counts; with equal group sizes (GRPO groups) that is the sample mean.
    """
    names = bucket_names(buckets)
    vals = torch.tensor(_as_values(hwe, len(names), "hwe"), dtype=torch.float64)
    return {b: round(m) for b, m in bucket_means(vals, names).items()}


def validation_targets(
    hwe: Tensor | Sequence[float], coef: Mapping[str, float] = VALIDATION_TARGET_COEF
) -> dict[str, int]:
    """ARES's validation targets: ``int(min + c_d (max - min))`` over all counts, c = {.35, .5, .65}."""
    vals = torch.as_tensor(hwe).detach().to(torch.float64).cpu().reshape(-1)
    if vals.numel() == 0:
        raise ValueError("validation_targets: no HWE counts given")
    lo, hi = float(vals.min()), float(vals.max())
    return {b: int(lo + float(coef[b]) * (hi - lo)) for b in BUCKETS}


def resolve_targets(
    hwe: Tensor | Sequence[float],
    names: list[str],
    state: AresRewardState,
    targets: Mapping[str, float] | None,
) -> dict[str, float]:
    chosen = targets if targets is not None else state.targets
    if chosen is None:
        return {k: float(v) for k, v in bucket_targets(hwe, names).items()}
    missing = sorted({d for d in names if d not in chosen})
    if missing:
        raise ValueError(f"targets have no value for bucket(s) {missing}; given: {dict(chosen)}")
    return {k: float(v) for k, v in chosen.items()}


def hierarchical_entropy_reward(
    correct: Tensor,
    hwe: Tensor | Sequence[float],
    buckets: Sequence[str] | Tensor,
    state: AresRewardState,
    *,
    targets: Mapping[str, float] | None = None,
) -> Tensor:
    """AEPO hierarchical entropy reward ``r_H [N]`` (float32; ARES ``examples/reward_function/aepo.py``).

    ``correct [N]`` (bool or 0/1; correct means > 0.5), ``hwe [N]`` HWE counts N(o), bucket per
    sample. Targets: ``targets`` if given, else ``state.targets``, else :func:`bucket_targets`.
    With ``delta = N - T_d``, ``m = max(1, f_d max(T_d, 1))`` (f = .15/.25/.35), Huber ``h``
    with kappa = 2/3/4, ``s(x) = sigmoid(x / tau)`` with tau = 2/2.5/3, cap ``c = alpha_d *
    {1, 1, 1.2}``:

    - easy, correct:   ``-min(c, h(max(delta - m, 0)) / (m + kappa) * c)``
    - medium, correct: ``-min(c, h(max(|delta| - m, 0)) / (m + kappa) * c)``
    - easy / medium, wrong: ``s(max(delta - m, 0)) * c * {0.6, 0.8}``
    - hard, correct:   ``s(delta + m) * c`` if ``delta >= -m`` else ``-min(c, 0.5 h(-delta - m) / (m + kappa) * c)``
    - hard, wrong:     ``s(max(delta - m, 0)) * c``
    """
    names = bucket_names(buckets)
    n = len(names)
    ok = [v > 0.5 for v in _as_values(correct, n, "correct")]
    counts = _as_values(hwe, n, "hwe")
    tg = resolve_targets(counts, names, state, targets)
    out: list[float] = []
    for d, right, count in zip(names, ok, counts):
        delta = count - tg[d]
        m = margin(tg[d], MARGIN_FRAC[d])
        kappa, temp = HUBER_KAPPA[d], SIGMOID_TEMP[d]
        cap = state.alpha[d] * CAP_SCALE[d]
        if not right:
            r = sigmoid_t(max(delta - m, 0.0), temp) * cap * WRONG_GAIN[d]
        elif d == "easy":
            r = -min(cap, huber(max(delta - m, 0.0), kappa) / (m + kappa) * cap)
        elif d == "medium":
            r = -min(cap, huber(max(abs(delta) - m, 0.0), kappa) / (m + kappa) * cap)
        elif delta >= -m:
            r = sigmoid_t(delta + m, temp) * cap
        else:
            r = -min(cap, HARD_UNDER_SCALE * huber(-delta - m, kappa) / (m + kappa) * cap)
        out.append(r)
    device = correct.device if isinstance(correct, Tensor) else None
    return torch.tensor(out, dtype=torch.float32, device=device)


def update_alpha(
    state: AresRewardState,
    hwe: Tensor | Sequence[float],
    buckets: Sequence[str] | Tensor,
    targets: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Adapt ``alpha_d`` for each bucket present; returns the new alphas.

    ``alpha_d <- clip(alpha_d + lr * Delta_d, alpha_min, alpha_max)`` with ``Delta_d = mean - T_d``
    for easy / medium (too many HWE triggers -> larger penalty cap) and ``T_d - mean`` for hard
    (too few -> larger bonus cap); ``mean`` is the bucket's mean count, targets resolved as in
    :func:`hierarchical_entropy_reward`. ARES updates alpha *before* computing the reward.
    """
    names = bucket_names(buckets)
    counts = _as_values(hwe, len(names), "hwe")
    tg = resolve_targets(counts, names, state, targets)
    for b in BUCKETS:
        sel = [v for v, d in zip(counts, names) if d == b]
        if not sel:
            continue
        mean = sum(sel) / len(sel)
        delta = mean - tg[b] if b in ("easy", "medium") else tg[b] - mean
        state.alpha[b] = min(max(state.alpha[b] + state.lr * delta, state.alpha_min), state.alpha_max)
    return dict(state.alpha)


def aepo_entropy_reward(
    correct: Tensor,
    hwe: Tensor | Sequence[float],
    buckets: Sequence[str] | Tensor,
    state: AresRewardState,
    *,
    targets: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """One step in ARES's order: resolve targets, :func:`update_alpha`, then the reward.

    Returns ``(r_H [N] float32, targets used)``.
    """
    names = bucket_names(buckets)
    counts = _as_values(hwe, len(names), "hwe")
    tg = resolve_targets(counts, names, state, targets)
    update_alpha(state, counts, names, tg)
    r = hierarchical_entropy_reward(correct, counts, names, state, targets=tg)
    return r, tg
