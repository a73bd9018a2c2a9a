"""Branching policies of the tree rollout engine (:mod:`mmpo.rollout.engines.tree`) as hook objects.

The engine runs live rows in one KV-cache loop and asks the policy, each step, what to do:

* ``budget(group)`` leaves per group; ``initial_children(group)`` / ``initial_mode(group, i)``
  the first rows and their sampling mode ("sample": the run's sampling settings; "tree":
  greedy under the raw distribution, every token marked forced);
* ``should_stop(row, node, eos, at_limit)`` -> ``(reason, truncated)`` or None, after each token;
* ``segment_length()`` and ``on_boundary(group)`` -> children per live row (TreePO);
* ``on_token(rows, top_p, top_i, groups)`` -> ``[(row, forced_token)]`` (LATR);
* ``should_prune(rows, step)`` -> rows to prune with their descendants (LATR lookahead);
* ``on_phase(step, groups)`` -> None (stay) or ``[(row, k)]`` copies to make before every row
  switches to "sample" (LATR exit and fill);
* ``on_group_idle(group)`` -> ``[Rewind]`` (TreePO fallback).

TreePO: arXiv 2508.17445 (segment tree, fixed_avg allocator, random-boundary fallback).
LATR: arXiv 2510.24302 (top-m forced branching, capacity, lookahead similarity pruning, exit
rule). Formulas and defaults: ``docs/algorithms.md``, branching rollouts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mmpo.errors import ConfigError
from mmpo.rollout.tree import Forest, Node, fallback_cut

__all__ = [
    "BranchingPolicy",
    "GroupView",
    "LATRPolicy",
    "Rewind",
    "Row",
    "TreePOPolicy",
    "build_branching_policy",
    "check_tree_config",
    "edit_distance",
    "eta_at",
    "fixed_avg_allocation",
    "has_boxed",
    "has_repetition",
    "latr_eligible",
    "rouge_l",
    "suffix_match",
]


@dataclass(eq=False)
class Row:
    """A live row of the engine: its current node, sampling mode and response context."""

    node: int
    group: int
    mode: str = "sample"  # "sample" | "tree"
    tokens: list[int] = field(default_factory=list)  # response tokens of the row's context
    logprob_sum: float = 0.0
    parent: "Row | None" = None  # the row it was forked from (LATR branches)
    birth_step: int | None = None  # step of its first (forced) token; None for a first row
    birth_pos: int = 0  # response index of that token
    tree: bool = False  # a LATR tree row (plain rows are False)
    alive: bool = True
    origin: int | None = None  # the node the row started in (a fork's new child)

    @property
    def is_branch(self) -> bool:
        return self.birth_step is not None


@dataclass
class GroupView:
    """A group as the policy sees it: live rows (batch order), finished leaves, finished_now
    (leaves finished since the last boundary allocation) and the leaf budget."""

    group: int
    rows: list[Row]
    leaves: list[int]
    finished_now: int
    budget: int
    forest: Forest


@dataclass
class Rewind:
    """New rows whose context is ``leaf``'s response truncated to ``cut`` tokens."""

    leaf: int
    cut: int
    k: int


class BranchingPolicy:
    """No branching: ``n`` independent rows per group (the base of every policy)."""

    name = "plain"

    def __init__(self, n: int, max_tokens: int | None = None) -> None:
        self.n = int(n)
        self.max_tokens = max_tokens
        self.decode: Callable[[list[int]], str] = lambda ids: ""
        self.token_text: Callable[[int], str] = lambda tok: ""
        self.stats: dict[str, float] = {}

    def budget(self, group: int) -> int:
        return self.n

    def initial_children(self, group: int) -> int:
        return self.n

    def initial_mode(self, group: int, index: int) -> str:
        return "sample"

    def should_stop(self, row: Row, node: Node, eos: bool, at_limit: bool) -> tuple[str, bool] | None:
        if eos:
            return "eos", False
        if at_limit:
            return "max_tokens", True
        return None

    def segment_length(self) -> int | None:
        return None

    def on_boundary(self, view: GroupView) -> list[int]:
        return [1] * len(view.rows)

    def on_token(
        self, rows: list[Row], top_p: torch.Tensor, top_i: torch.Tensor, groups: dict[int, GroupView], step: int
    ) -> list[tuple[Row, int]]:
        return []

    def should_prune(self, rows: list[Row], step: int) -> list[Row]:
        return []

    def on_phase(self, step: int, groups: dict[int, GroupView]) -> list[tuple[Row | int, int]] | None:
        return None

    def on_group_idle(self, view: GroupView) -> list[Rewind]:
        return []


# -- TreePO ------------------------------------------------------------------------------------
_BOXED = re.compile(r"\\boxed\{")


def has_boxed(text: str) -> bool:
    """Whether ``text`` holds a complete ``\\boxed{...}`` (braces balanced after the opening one)."""
    for m in _BOXED.finditer(text):
        depth = 1
        for ch in text[m.end() :]:
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return True
    return False


def has_repetition(text: str, chars: int = 32, count: int = 8) -> bool:
    """TreePO's repetition stop: some ``chars``-character substring occurs at least ``count``
    times in ``text`` (overlapping occurrences counted)."""
    if len(text) < chars + count - 1:
        return False
    seen: dict[str, int] = {}
    for i in range(len(text) - chars + 1):
        s = text[i : i + chars]
        seen[s] = seen.get(s, 0) + 1
        if seen[s] >= count:
            return True
    return False


def fixed_avg_allocation(k: int, finished: int, finished_now: int, n: int, w: int) -> list[int]:
    """TreePO ``fixed_avg``: children of each of ``k`` live paths. R = max(n - finished, 0),
    T = max(min(R, w * finished_now + w * k), k); the first k - 1 paths get T // k, the last
    T // k + T % k (each at least 1)."""
    if k <= 0:
        return []
    R = max(n - finished, 0)
    T = max(min(R, w * finished_now + w * k), k)
    q, m = divmod(T, k)
    return [max(q, 1)] * (k - 1) + [max(q + m, 1)]


def weighted_allocation(scores: list[float], total: int, tau: float = 1.0) -> list[int]:
    """Each path gets 1; the other ``total - k`` are split by weights softmax(scores / tau) with
    the largest-remainder method (TreePO's log-prob-weighted division)."""
    k = len(scores)
    if k == 0:
        return []
    extra = max(total - k, 0)
    w = torch.softmax(torch.tensor(scores, dtype=torch.float64) / tau, dim=0)
    share = w * extra
    base = share.floor().long()
    left = extra - int(base.sum())
    order = torch.argsort(-(share - base), stable=True)
    base[order[:left]] += 1
    return [1 + int(b) for b in base]


class TreePOPolicy(BranchingPolicy):
    """TreePO segment tree (arXiv 2508.17445, §1.1 of the design): ``w`` first rows; segments of
    ``segment_length`` tokens; at each boundary the live paths of a group get children by the
    ``div`` allocator; a group left without live paths and fewer than ``n`` leaves is refilled
    by rewinding finished leaves to a random segment boundary (``fallback="random"``).

    Stop rules, in the released order: complete ``\\boxed{}`` and EOS (FINISHED); EOS
    (EARLY_STOPPED_BY_EOS); ``max_tokens`` (MAX_OUTPUT_TOKENS); at a segment end, depth >=
    ``max_depth`` (MAX_INFER_STEPS), then a repeated 32-character substring (REPETITION_STOP).
    ``boxed_as_eos``: a complete ``\\boxed{}`` in a finished segment also finishes (code default;
    off as in the released script). ``first_width_range``: draw the first width in this range
    (the reference's ineffective knob; off).
    """

    name = "treepo"
    DIVS = ("fixed_avg", "logprob_weighted_div", "inverse_logprob_weighted_div")

    def __init__(
        self,
        n: int,
        w: int = 2,
        segment_length: int = 512,
        max_depth: int = 14,
        max_tokens: int | None = None,
        fallback: str = "random",
        div: str = "fixed_avg",
        div_temperature: float = 1.0,
        boxed_as_eos: bool = False,
        repetition_chars: int = 32,
        repetition_count: int = 8,
        first_width_range: tuple[int, int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(n, max_tokens)
        self.w, self.S, self.max_depth = int(w), int(segment_length), int(max_depth)
        self.fallback, self.div, self.div_temperature = fallback, div, float(div_temperature)
        self.boxed_as_eos = bool(boxed_as_eos)
        self.rep = (int(repetition_chars), int(repetition_count))
        self.first_width_range = first_width_range
        self.rng = torch.Generator().manual_seed(int(seed))

    def initial_children(self, group: int) -> int:
        if self.first_width_range:
            lo, hi = self.first_width_range
            return min(self.n, int(torch.randint(lo, hi + 1, (1,), generator=self.rng)))
        return min(self.w, self.n)

    def segment_length(self) -> int:
        return self.S

    def should_stop(self, row: Row, node: Node, eos: bool, at_limit: bool) -> tuple[str, bool] | None:
        seg_end = len(node.token_ids) >= self.S
        if eos:
            return ("FINISHED" if has_boxed(self.decode(node.token_ids)) else "EARLY_STOPPED_BY_EOS"), False
        if at_limit:
            return "MAX_OUTPUT_TOKENS", True
        if seg_end:
            if self.boxed_as_eos and has_boxed(self.decode(node.token_ids)):
                return "FINISHED", False
            if node.depth >= self.max_depth:
                return "MAX_INFER_STEPS", True
            if has_repetition(self.decode(node.token_ids), *self.rep):
                return "REPETITION_STOP", True
        return None

    def on_boundary(self, view: GroupView) -> list[int]:
        k = len(view.rows)
        if self.div == "fixed_avg":
            return fixed_avg_allocation(k, len(view.leaves), view.finished_now, self.n, self.w)
        R = max(self.n - len(view.leaves), 0)
        T = max(min(R, self.w * view.finished_now + self.w * k), k)
        c = [r.logprob_sum for r in view.rows]
        lo = min(c)
        scores = [-(x - lo) for x in c] if self.div == "logprob_weighted_div" else [x - lo for x in c]
        return weighted_allocation(scores, T, self.div_temperature)

    def on_group_idle(self, view: GroupView) -> list[Rewind]:
        remaining = self.n - len(view.leaves)
        if self.fallback == "none" or remaining <= 0:
            return []
        f = view.forest
        cands = [
            leaf
            for leaf in view.leaves
            if f.nodes[leaf].finish_reason in ("FINISHED", "EARLY_STOPPED_BY_EOS")
            and "copy_of" not in f.nodes[leaf].info
        ]
        if not cands:  # restart from the prompt
            return [Rewind(view.leaves[0], 0, min(self.w, remaining))] if view.leaves else []
        order = torch.randperm(len(cands), generator=self.rng).tolist()
        out = []
        for i in order:
            if remaining <= 0:
                break
            leaf = cands[i]
            length = len(f.context_tokens(leaf))
            B = max(1, math.ceil(length / self.S))
            b = int(torch.randint(1, B + 1, (1,), generator=self.rng))
            cut, _ = fallback_cut(length, self.S, b)
            k = min(self.w, remaining)
            out.append(Rewind(leaf, cut, k))
            remaining -= k
        return out


# -- LATR --------------------------------------------------------------------------------------
def latr_eligible(p1: float, pk: float, tau_abs: float, tau_rel: float) -> bool:
    """LATR: a lower-ranked candidate branches iff p_k > tau_abs and p_1 - p_k < tau_rel (the
    fixed sign of the reference's last commit)."""
    return pk > tau_abs and (p1 - pk) < tau_rel


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance of two token lists."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _longest_suffix_in(a: list[int], b: list[int]) -> int:
    best = 0
    for L in range(1, len(a) + 1):
        suf = a[len(a) - L :]
        if any(b[i : i + L] == suf for i in range(len(b) - L + 1)):
            best = L
        else:
            break
    return best


def suffix_match(a: list[int], b: list[int]) -> float:
    """Longest suffix of one window occurring contiguously in the other (both directions), / len(a)."""
    return max(_longest_suffix_in(a, b), _longest_suffix_in(b, a)) / max(len(a), 1)


def rouge_l(a: list[int], b: list[int]) -> float:
    """ROUGE-L F1 of two equal-length token windows (precision = recall = LCS / length)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def eta_at(schedule: dict[int, float], step: int) -> float:
    """LATR mix ratio: the value of the last schedule key <= ``step``."""
    items = sorted((int(k), float(v)) for k, v in schedule.items())
    val = items[0][1] if items else 1.0
    for k, v in items:
        if k <= step:
            val = v
    return val


_MATH = set("+-*/\\<>=()[]{}_^&%$0123456789")


class LATRPolicy(BranchingPolicy):
    """LATR token-level tree (arXiv 2510.24302, §2.1 of the design; defaults of the reference
    code). Per group: one tree row (greedy under the raw distribution) plus ``n - n_tree`` plain
    rows, ``n_tree = round(n * eta(step))``. A tree row forks onto its rank-k candidate
    (k = 2..m, forced) when p_k > ``tau_abs`` and p_1 - p_k < ``tau_rel``, within the group's
    ``n_tree`` capacity (rank, then row order; the rest counted as suppressed). At ages in
    ``lookahead`` a branch is compared with its parent over the same positions and pruned with
    its descendants when similar (edit distance < ``tau_ed``, suffix match > ``tau_suf``,
    ROUGE-L > ``tau_rouge``; None disables a test). The tree phase ends by the exit rule
    (theta_0, delta, ``force_return_step``); groups with fewer than n_tree tree rows are filled
    with copies of their first tree row, then every row samples normally.
    """

    name = "latr"

    def __init__(
        self,
        n: int,
        max_tokens: int | None = None,
        m: int = 2,
        tau_abs: float = 0.25,
        tau_rel: float = 0.15,
        tau_ed: float | None = 0.4,
        tau_suf: float | None = None,
        tau_rouge: float | None = None,
        lookahead: tuple[int, ...] = (20, 30, 50),
        eta_schedule: dict[int, float] | None = None,
        theta0: float = 0.98,
        delta: float = 0.0,
        force_return_step: int | None = None,
        keep_math_symbols: bool = True,
        sample_nk: str = "none",
        step: int = 0,
    ) -> None:
        super().__init__(n, max_tokens)
        self.m, self.tau_abs, self.tau_rel = int(m), float(tau_abs), float(tau_rel)
        self.tau_ed, self.tau_suf, self.tau_rouge = tau_ed, tau_suf, tau_rouge
        self.lookahead = tuple(int(x) for x in lookahead)
        self.eta_schedule = dict(eta_schedule or {0: 1.0})
        self.theta0, self.delta = float(theta0), float(delta)
        self.force_return_step = force_return_step
        self.keep_math_symbols = bool(keep_math_symbols)
        self.sample_nk = sample_nk
        self.step = int(step)
        self.in_tree = True
        self.stats = {"suppressed": 0.0, "pruned": 0.0, "branches": 0.0, "exit_step": -1.0}

    @property
    def n_tree(self) -> int:
        return int(round(self.n * eta_at(self.eta_schedule, self.step)))

    def initial_children(self, group: int) -> int:
        return self.n - self.n_tree + (1 if self.n_tree else 0)

    def initial_mode(self, group: int, index: int) -> str:
        return "tree" if self.n_tree and index == 0 else "sample"

    def _tree_count(self, view: GroupView) -> tuple[int, int]:
        """(live tree rows, finished tree leaves) of a group."""
        live = sum(r.tree for r in view.rows)
        done = sum(1 for leaf in view.leaves if view.forest.nodes[leaf].info.get("tree"))
        return live, done

    def on_token(
        self, rows: list[Row], top_p: torch.Tensor, top_i: torch.Tensor, groups: dict[int, GroupView], step: int
    ) -> list[tuple[Row, int]]:
        if not self.in_tree:
            return []
        forks: list[tuple[Row, int]] = []
        p, idx = top_p.tolist(), top_i.tolist()
        by_group: dict[int, list[int]] = {}
        for j, r in enumerate(rows):
            by_group.setdefault(r.group, []).append(j)
        for g, js in by_group.items():
            live, done = self._tree_count(groups[g])
            free = self.n_tree - live - done
            for rank in range(1, min(self.m, len(p[0]))):
                for j in js:
                    if latr_eligible(p[j][0], p[j][rank], self.tau_abs, self.tau_rel):
                        if free > 0:
                            forks.append((rows[j], idx[j][rank]))
                            free -= 1
                        else:
                            self.stats["suppressed"] += 1
        self.stats["branches"] += len(forks)
        return forks

    def similar(self, a: list[int], p: list[int]) -> bool:
        """Whether any enabled test finds windows ``a`` (branch) and ``p`` (parent) similar."""
        L = len(a)
        if self.tau_ed is not None and edit_distance(a, p) / L < self.tau_ed:
            return True
        if self.tau_suf is not None and suffix_match(a, p) > self.tau_suf:
            return True
        return self.tau_rouge is not None and rouge_l(a, p) > self.tau_rouge

    def should_prune(self, rows: list[Row], step: int) -> list[Row]:
        if not self.in_tree:
            return []
        out = []
        for b in rows:
            if not (b.tree and b.is_branch and b.alive and b.parent is not None):
                continue
            age = step + 1 - b.birth_step
            if age not in self.lookahead:
                continue
            lo, hi = b.birth_pos, b.birth_pos + age
            a, par = b.tokens[lo:hi], b.parent.tokens[lo:hi]
            if len(a) < age or len(par) < age:  # the parent ended (EOS) inside the window
                continue
            if self.is_eos(a) or self.is_eos(par):
                continue
            if self.keep_math_symbols and _is_math(self.token_text(par[0])):
                continue
            if self.similar(a, par):
                out.append(b)
        self.stats["pruned"] += len(out)
        return out

    is_eos: Callable[[list[int]], bool] = staticmethod(lambda toks: False)  # set by the engine

    def on_phase(self, step: int, groups: dict[int, GroupView]) -> list[tuple[Row | int, int]] | None:
        if not self.in_tree:
            return None
        effs, young, any_live = 0, False, False
        for view in groups.values():
            live, done = self._tree_count(view)
            any_live |= live > 0
            effs += self.n_tree if live == 0 else live + done
            young |= any(
                r.tree and r.is_branch and step + 1 - r.birth_step < max(self.lookahead, default=0) for r in view.rows
            )
        L = self.max_tokens or 1
        theta = self.theta0 - self.delta * step / L
        exit_now = (effs >= round(self.n_tree * len(groups) * theta) and not young) or not any_live
        if self.force_return_step is not None and step >= self.force_return_step:
            exit_now = True
        if not exit_now:
            return None
        self.in_tree = False
        self.stats["exit_step"] = float(step)
        fills = []
        for view in groups.values():
            live, done = self._tree_count(view)
            need = self.n_tree - live - done
            if need <= 0 or not self.n_tree:
                continue
            tree_rows = [r for r in view.rows if r.tree]
            if tree_rows:  # the root branch if live, else the first live tree row
                fills.append((next((r for r in tree_rows if not r.is_branch), tree_rows[0]), need))
            else:  # every tree row ended: copies of the first tree leaf
                first_leaf = min(leaf for leaf in view.leaves if view.forest.nodes[leaf].info.get("tree"))
                fills.append((first_leaf, need))
        return fills


def _is_math(text: str) -> bool:
    s = text.strip()
    return bool(s) and all(ch in _MATH for ch in s)


# -- config ------------------------------------------------------------------------------------
_TREEPO_KEYS = {
    "n": None,
    "w": 2,
    "segment_length": 512,
    "max_depth": 14,
    "max_tokens": None,
    "fallback": "random",
    "div": "fixed_avg",
    "div_temperature": 1.0,
    "boxed_as_eos": False,
    "repetition_chars": 32,
    "repetition_count": 8,
    "first_width_range": None,
    "seed": 0,
}
_LATR_KEYS = {
    "n": None,
    "max_tokens": None,
    "m": 2,
    "tau_abs": 0.25,
    "tau_rel": 0.15,
    "tau_ed": 0.4,
    "tau_suf": None,
    "tau_rouge": None,
    "lookahead": [20, 30, 50],
    "eta_schedule": {0: 1.0},
    "theta0": 0.98,
    "delta": 0.0,
    "force_return_step": None,
    "keep_math_symbols": True,
    "sample_nk": "none",
}
#: method -> accepted keys with defaults (arpo / aepo_agent branch in the agent loop: keys unchecked here)
TREE_METHODS: dict[str, dict[str, Any] | None] = {
    "treepo": _TREEPO_KEYS,
    "latr": _LATR_KEYS,
    "arpo": None,
    "aepo_agent": None,
}


def check_tree_config(tree: dict[str, Any], where: str = "rollout.tree") -> None:
    """Refuse a bad ``rollout.tree`` block with a ConfigError naming the key and the value."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'method', got {tree!r}")
    method = tree.get("method")
    if method not in TREE_METHODS:
        raise ConfigError(f"{where}.method: one of {', '.join(TREE_METHODS)}, got {method!r}")
    keys = TREE_METHODS[method]
    if keys is None:
        return
    for k in tree:
        if k != "method" and k not in keys:
            raise ConfigError(
                f"{where}.{k}: unknown key of method {method!r} (value {tree[k]!r}); valid keys: {', '.join(keys)}"
            )

    def positive_int(k: str, allow_none: bool = True) -> None:
        v = tree.get(k)
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}.{k}: a positive integer, got {v!r}")

    def unit(k: str, allow_none: bool = False) -> None:
        v = tree.get(k, keys[k])
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"{where}.{k}: a number in [0, 1], got {v!r}")

    positive_int("n")
    positive_int("max_tokens")
    if method == "treepo":
        for k in ("w", "segment_length", "max_depth", "repetition_chars", "repetition_count"):
            if k in tree:
                positive_int(k, allow_none=False)
        if tree.get("fallback", "random") not in ("random", "none"):
            raise ConfigError(f"{where}.fallback: 'random' or 'none', got {tree.get('fallback')!r}")
        if tree.get("div", "fixed_avg") not in TreePOPolicy.DIVS:
            raise ConfigError(f"{where}.div: one of {', '.join(TreePOPolicy.DIVS)}, got {tree.get('div')!r}")
        fw = tree.get("first_width_range")
        if fw is not None and not (
            isinstance(fw, (list, tuple))
            and len(fw) == 2
            and all(isinstance(x, int) and x >= 1 for x in fw)
            and fw[0] <= fw[1]
        ):
            raise ConfigError(f"{where}.first_width_range: [lo, hi] with 1 <= lo <= hi, got {fw!r}")
    else:
        positive_int("force_return_step")
        if "m" in tree:
            positive_int("m", allow_none=False)
        if int(tree.get("m", 2)) < 2:
            raise ConfigError(f"{where}.m: at least 2 candidates per token, got {tree.get('m')!r}")
        unit("tau_abs")
        unit("tau_rel")
        for k in ("tau_ed", "tau_suf", "tau_rouge"):
            unit(k, allow_none=True)
        la = tree.get("lookahead", [20, 30, 50])
        if not isinstance(la, (list, tuple)) or not la or not all(isinstance(x, int) and x >= 1 for x in la):
            raise ConfigError(f"{where}.lookahead: a non-empty list of positive integers, got {la!r}")
        sched = tree.get("eta_schedule", {0: 1.0})
        if (
            not isinstance(sched, dict)
            or not sched
            or not all(
                _is_intlike(k) and isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0 for k, v in sched.items()
            )
        ):
            raise ConfigError(f"{where}.eta_schedule: a mapping step -> ratio in [0, 1], got {sched!r}")
        if tree.get("sample_nk", "none") != "none":
            raise ConfigError(
                f"{where}.sample_nk: only 'none' (greedy tree phase) is implemented, got {tree.get('sample_nk')!r}"
            )


def _is_intlike(k: Any) -> bool:
    try:
        return int(k) >= 0
    except (TypeError, ValueError):
        return False


def build_branching_policy(
    tree: dict[str, Any], group_size: int, max_tokens: int, *, step: int = 0, where: str = "rollout.tree"
) -> BranchingPolicy:
    """The branching policy of a ``rollout.tree`` block (``n`` defaults to ``group_size``,
    ``max_tokens`` to the run's ``max_new_tokens``)."""
    check_tree_config(tree, where)
    method = tree["method"]
    opts = {k: v for k, v in tree.items() if k != "method"}
    opts["n"] = int(opts.get("n") or group_size)
    opts["max_tokens"] = min(int(opts.get("max_tokens") or max_tokens), max_tokens)
    if method == "treepo":
        if opts.get("first_width_range") is not None:
            opts["first_width_range"] = tuple(opts["first_width_range"])
        return TreePOPolicy(**opts)
    if method == "latr":
        if "eta_schedule" in opts:
            opts["eta_schedule"] = {int(k): float(v) for k, v in opts["eta_schedule"].items()}
        if "lookahead" in opts:
            opts["lookahead"] = tuple(opts["lookahead"])
        return LATRPolicy(step=step, **opts)
    raise ConfigError(
        f"{where}.method: {method!r} branches after tool observations (agent loop), not in the tree engine"
    )
