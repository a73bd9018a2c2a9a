"""Advantage adapters for branching (tree) rollouts: TreePO, ARPO hard attribution, agentic AEPO.

Tree rollouts are materialised as *replicated rows*: one row per leaf holding every token on its
root-to-leaf path, so a token of a shared node appears in every row through that node. The inputs
here are plain tensors and lists (no dependency on the rollout tree classes):

- ``leaf_paths``: per row, the node ids on its path, root excluded, root-to-leaf order;
- ``token_node [N, T]``: the node id of every response token, -1 on padding. A node's tokens are
  contiguous in a row and lie at the same positions in every row through it;
- ``row_leaf [N]``: the leaf node id of every row.

Functions (see ``docs/algorithms.md``):

- :func:`tree_subgroup_advantage` / :func:`token_whiten`: TreePO subtree-averaged advantage and batch
  token whitening (TreePO, arXiv 2508.17445);
- :func:`tree_node_values`, :func:`tree_segment_advantage`, :func:`scatter_node_values`: TreePO's
  explicit segment-level variant;
- :func:`shared_mean_attribution`: ARPO "hard" advantage attribution (ARPO, arXiv 2507.19849);
- :func:`entropy_aware`: the entropy-aware token advantage of agentic AEPO (arXiv 2510.14545).

Registered in ``ADVANTAGES``: ``tree_subgroup``, ``arpo_hard`` and ``aepo_agent`` (the agentic AEPO,
not ARES's ``aepo``). ARPO's default "soft" attribution is plain ``grpo`` over the replicated rows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mmpo.core._tensor import as_float, check_shapes, group_index, group_mean_std
from mmpo.core.advantages import ADVANTAGES, _stateless, grpo
from mmpo.errors import ConfigError

_WEIGHTS = ("average", "group_size")
_STD_MODES = ("unb", "pop")
_SCOPES = ("group", "batch")


# --------------------------------------------------------------------------- option checks


def _check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _check_positive(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{option} must be a positive number, got {value!r}")


def _check_bool(option: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{option} must be true or false, got {value!r}")


def _check_max_depth(max_depth: object) -> None:
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0):
        raise ConfigError(f"max_depth must be None or an integer >= 0, got {max_depth!r}")


# --------------------------------------------------------------------------- TreePO


def _leaf_inputs(rewards: Tensor, leaf_paths: Sequence[Sequence[int]], group_ids: Tensor) -> tuple[Tensor, list, list]:
    r = as_float(rewards).detach()
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D [L], got shape {tuple(r.shape)}")
    check_shapes("group_ids", group_ids, tuple(r.shape))
    if len(leaf_paths) != r.shape[0]:
        raise ValueError(f"leaf_paths has {len(leaf_paths)} paths for {r.shape[0]} rewards")
    return r, [tuple(int(v) for v in p) for p in leaf_paths], [int(g) for g in group_ids.tolist()]


def _prefix_groups(paths: list[tuple[int, ...]], gids: list[int], depth_cap: int | None) -> dict:
    """``{(group, prefix): [leaf indices]}`` for every prefix length 0..D_i (capped) of every leaf."""
    members: dict[tuple[int, tuple[int, ...]], list[int]] = defaultdict(list)
    for i, (path, g) in enumerate(zip(paths, gids)):
        top = len(path) if depth_cap is None else min(len(path), depth_cap)
        for d in range(top + 1):
            members[(g, path[:d])].append(i)
    return members


def tree_subgroup_advantage(
    rewards: Tensor,
    leaf_paths: Sequence[Sequence[int]],
    group_ids: Tensor,
    *,
    weight: str = "average",
    skip_zero_std: bool = False,
    max_depth: int | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """TreePO subtree-averaged leaf advantage (TreePO, arXiv 2508.17445; ``docs/algorithms.md``).

    For leaf i of group g and prefix length d >= 0, ``G_d(i)`` = the leaves of g whose first d path nodes
    equal those of i (``G_0`` = the whole group); ``mu(G)`` = mean reward over G when ``|G| >= 2``, else 0.
    Contributing groups ``S(i) = {G_0(i)} + {G_d(i) : 1 <= d <= max_depth, |G_d(i)| >= 2}`` (the leaf's
    own node, ``G_{D_i} = {i}``, never counts). Then

    - ``weight="average"`` (TreePO's released training script; default): ``a_i = mean_{G in S(i)} (R_i - mu(G))``
    - ``weight="group_size"`` (the reference code's default): ``a_i = sum |G| (R_i - mu(G)) / sum |G|``

    ``skip_zero_std=True`` (``subtree_std_ds``) drops a group with d >= 1 whose rewards have unbiased
    std < ``eps``. ``max_depth`` caps d (``tree_subgroup_opt``; the released script uses 14; None = no cap).
    A one-leaf group gets ``a = R`` (``mu(G_0) = 0``). Follow with :func:`token_whiten` (TreePO whitens over
    the batch's tokens; there is no per-group std division).

    rewards [L], leaf_paths L lists of node ids (root excluded), group_ids [L] -> advantages [L]
    """
    _check_choice("weight", weight, _WEIGHTS)
    _check_bool("skip_zero_std", skip_zero_std)
    _check_max_depth(max_depth)
    _check_positive("eps", eps)
    r, paths, gids = _leaf_inputs(rewards, leaf_paths, group_ids)
    vals = r.to(torch.float64).tolist()
    members = _prefix_groups(paths, gids, max_depth)
    stats: dict = {}
    for key, idx in members.items():
        xs = [vals[j] for j in idx]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        stats[key] = (len(xs), mean if len(xs) >= 2 else 0.0, std)
    out = []
    for i, (path, g) in enumerate(zip(paths, gids)):
        top = len(path) if max_depth is None else min(len(path), max_depth)
        terms: list[tuple[int, float]] = []
        for d in range(top + 1):
            size, mean, std = stats[(g, path[:d])]
            if d >= 1 and (size < 2 or (skip_zero_std and std < eps)):
                continue
            terms.append((size, vals[i] - mean))
        if weight == "average":
            out.append(sum(t for _, t in terms) / len(terms))
        else:
            out.append(sum(s * t for s, t in terms) / sum(s for s, _ in terms))
    return torch.tensor(out, dtype=r.dtype, device=r.device)


def token_whiten(adv: Tensor, mask: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Whiten advantages over all valid tokens of the batch (TreePO, arXiv 2508.17445; verl ``masked_whiten``).

    ``A^ = (a - m) / sqrt(v + eps)`` with ``m`` the token-weighted mean and ``v`` the unbiased (Bessel over
    the total valid-token count) variance of ``a`` over the cells where ``mask`` holds; long rows weigh
    more. With fewer than two valid tokens ``v`` is taken as 0. Masked cells are 0 in the output.

    adv [N, T] (or [N], broadcast over T), mask [N, T] bool -> [N, T]
    """
    _check_positive("eps", eps)
    mask = mask.bool()
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [N, T], got shape {tuple(mask.shape)}")
    a = as_float(adv).detach()
    if a.dim() == 1:
        check_shapes("adv", a, (mask.shape[0],))
        a = a[:, None].expand(mask.shape)
    check_shapes("adv", a, tuple(mask.shape))
    x = a.to(torch.float64)
    count = int(mask.sum())
    zeros = torch.zeros_like(x)
    mean = torch.where(mask, x, zeros).sum() / max(count, 1)
    centred = torch.where(mask, x - mean, zeros)
    var = (centred**2).sum() / (count - 1) if count > 1 else x.new_tensor(0.0)
    return (centred / torch.sqrt(var + eps)).to(a.dtype)


def tree_node_values(
    rewards: Tensor, leaf_paths: Sequence[Sequence[int]], group_ids: Tensor
) -> tuple[dict[int, float], list[float]]:
    """Node values of TreePO's segment-level variant (TreePO, arXiv 2508.17445; ``docs/algorithms.md``).

    ``r~_i = sum_{d=0}^{D_i} |G_d(i)| (R_i - mean_{G_d(i)} R) / sum_{d=0}^{D_i} |G_d(i)|`` (real means, the
    leaf's own ``G_{D_i}`` included with weight 1 and term 0). ``V(leaf i) = r~_i`` (the mean over rows when
    several rows share a leaf node); ``V(internal node)`` = mean of its children's V (children, not leaves).
    The root (not a node id here) has V = 0.

    rewards [L], leaf_paths, group_ids [L] -> ({node id: V}, r~ per leaf)
    """
    r, paths, gids = _leaf_inputs(rewards, leaf_paths, group_ids)
    vals = r.to(torch.float64).tolist()
    members = _prefix_groups(paths, gids, None)
    means = {k: sum(vals[j] for j in idx) / len(idx) for k, idx in members.items()}
    shaped = []
    for i, (path, g) in enumerate(zip(paths, gids)):
        num = den = 0.0
        for d in range(len(path) + 1):
            size = len(members[(g, path[:d])])
            num += size * (vals[i] - means[(g, path[:d])])
            den += size
        shaped.append(num / den)
    children: dict[int, set[int]] = defaultdict(set)
    leaf_vals: dict[int, list[float]] = defaultdict(list)
    for i, path in enumerate(paths):
        if not path:
            raise ValueError(f"leaf_paths[{i}] is empty: every leaf needs at least one node")
        for parent, child in zip(path[:-1], path[1:]):
            children[parent].add(child)
        leaf_vals[path[-1]].append(shaped[i])
    values: dict[int, float] = {}

    def value(node: int) -> float:
        if node not in values:
            if node in leaf_vals:
                values[node] = sum(leaf_vals[node]) / len(leaf_vals[node])
            else:
                kids = sorted(children[node])
                values[node] = sum(value(c) for c in kids) / len(kids)
        return values[node]

    depth = {v: k for p in paths for k, v in enumerate(p)}
    for node in sorted(depth, key=lambda v: -depth[v]):  # deepest first, so the recursion stays shallow
        value(node)
    return values, shaped


def tree_segment_advantage(
    rewards: Tensor,
    leaf_paths: Sequence[Sequence[int]],
    group_ids: Tensor,
    *,
    eta: float | None = None,
) -> list[dict[int, float]]:
    """TreePO explicit segment-level advantages (TreePO, arXiv 2508.17445; ``docs/algorithms.md``).

    With V from :func:`tree_node_values`, the k-th node of leaf i's path (k = 1..D_i, v_0 = the root,
    V(root) = 0) gets ``delta_{i,k} = V(v_k) - V(v_{k-1})``; with ``eta`` (> 0; default off)
    ``delta_{i,k} = V(v_k) - eta^(D_i + 1 - k) V(v_{k-1})``. Scatter to tokens with
    :func:`scatter_node_values`, then :func:`token_whiten`. Needs node boundaries at segment boundaries.

    rewards [L], leaf_paths, group_ids [L] -> per row ``{node id: delta}`` for the nodes on its path
    """
    if eta is not None:
        _check_positive("eta", eta)
    values, _ = tree_node_values(rewards, leaf_paths, group_ids)
    out = []
    for path in leaf_paths:
        depth = len(path)
        prev = 0.0
        row: dict[int, float] = {}
        for k, node in enumerate(path, start=1):
            scale = 1.0 if eta is None else eta ** (depth + 1 - k)
            row[int(node)] = values[int(node)] - scale * prev
            prev = values[int(node)]
        out.append(row)
    return out


def scatter_node_values(
    values: Mapping[int, float] | Sequence[Mapping[int, float]], token_node: Tensor, mask: Tensor
) -> Tensor:
    """Per-token values from per-node values: cell (i, t) gets ``values[token_node[i, t]]``.

    ``values`` is one ``{node id: value}`` for all rows, or one per row (as :func:`tree_segment_advantage`
    returns). Cells where ``mask`` is false are 0; a valid cell whose node has no value raises ValueError.

    values, token_node [N, T] long, mask [N, T] bool -> [N, T] float32
    """
    check_shapes("mask", mask, tuple(token_node.shape))
    n = token_node.shape[0]
    per_row = not isinstance(values, Mapping)
    if per_row and len(values) != n:
        raise ValueError(f"values has {len(values)} rows for token_node with {n} rows")
    out = torch.zeros(token_node.shape, dtype=torch.float32, device=token_node.device)
    mask = mask.bool()
    all_starts = _run_starts(token_node)
    run_len = _run_lengths(token_node, all_starts)
    rows, cols = torch.nonzero(all_starts & (token_node >= 0), as_tuple=True)
    nodes = token_node[rows, cols]
    for i, t, v, length in zip(rows.tolist(), cols.tolist(), nodes.tolist(), run_len[rows, cols].tolist()):
        table = values[i] if per_row else values
        if v not in table:
            if bool(mask[i, t : t + length].any()):
                raise ValueError(f"row {i}: node {v} has no value")
            continue
        out[i, t : t + length] = float(table[v])
    return torch.where(mask, out, torch.zeros_like(out))


# --------------------------------------------------------------------------- node runs in token_node


def _run_starts(token_node: Tensor) -> Tensor:
    """[N, T] bool: the cell starts a run of equal node ids (padding -1 runs included)."""
    starts = torch.ones_like(token_node, dtype=torch.bool)
    starts[:, 1:] = token_node[:, 1:] != token_node[:, :-1]
    return starts


def _run_lengths(token_node: Tensor, starts: Tensor) -> Tensor:
    """[N, T] long: at a run start, the length of the run (elsewhere undefined)."""
    n, t = token_node.shape
    idx = torch.arange(t, device=token_node.device).expand(n, t)
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    # next end at or after each position: reverse cummin of end positions
    end_pos = torch.where(ends, idx, torch.full_like(idx, t))
    next_end = torch.flip(torch.cummin(torch.flip(end_pos, [1]), dim=1).values, [1])
    return next_end - idx + 1


def _check_contiguous(token_node: Tensor, starts: Tensor) -> None:
    rows, cols = torch.nonzero(starts & (token_node >= 0), as_tuple=True)
    nodes = token_node[rows, cols]
    pairs = torch.stack([rows, nodes], dim=1)
    if pairs.shape[0] and torch.unique(pairs, dim=0).shape[0] != pairs.shape[0]:
        raise ValueError("token_node: a node's tokens must be contiguous in a row (a node id reappears later)")


def paths_from_token_node(token_node: Tensor, row_leaf: Tensor | None = None) -> list[list[int]]:
    """Each row's root-excluded path: its node ids in order of appearance (``-1`` padding skipped), with
    ``row_leaf[i]`` appended when it is not already the last node (a leaf without tokens). Nodes that hold
    no token in a row cannot be seen here.

    token_node [N, T] long (, row_leaf [N] long) -> N lists of node ids
    """
    if token_node.dim() != 2:
        raise ValueError(f"token_node must be 2-D [N, T], got shape {tuple(token_node.shape)}")
    n = token_node.shape[0]
    starts = _run_starts(token_node)
    _check_contiguous(token_node, starts)
    rows, cols = torch.nonzero(starts & (token_node >= 0), as_tuple=True)
    paths: list[list[int]] = [[] for _ in range(n)]
    for i, v in zip(rows.tolist(), token_node[rows, cols].tolist()):
        paths[i].append(v)
    if row_leaf is not None:
        check_shapes("row_leaf", row_leaf, (n,))
        for i, leaf in enumerate(row_leaf.tolist()):
            if leaf >= 0 and (not paths[i] or paths[i][-1] != leaf):
                paths[i].append(int(leaf))
    return paths


# --------------------------------------------------------------------------- ARPO hard attribution


def shared_mean_attribution(
    row_adv: Tensor, token_node: Tensor, mask: Tensor, group_ids: Tensor | None = None
) -> Tensor:
    """ARPO "hard" advantage attribution (ARPO, arXiv 2507.19849; ``docs/algorithms.md``).

    Every token of node v gets the mean row advantage over the rows through v:
    ``A^_{i,t} = (1/|S_v|) sum_{j in S_v} A_j`` with ``S_v`` = the rows whose ``token_node`` contains v
    (any cell, masked or not). A node held by one row keeps that row's advantage, so branch-specific
    tokens keep ``A_i``. Valid cells with ``token_node = -1`` (no node) also keep ``A_i``. With
    ``group_ids`` nodes are keyed by (group, node id). [UNVERIFIED] the exact normalisation of the
    paper's hard form (the released code uses the soft form: plain GRPO over the rows).

    row_adv [N], token_node [N, T] long, mask [N, T] bool (, group_ids [N]) -> [N, T] (0 on masked cells)
    """
    a = as_float(row_adv).detach()
    if a.dim() != 1:
        raise ValueError(f"row_adv must be 1-D [N], got shape {tuple(a.shape)}")
    n = a.shape[0]
    if token_node.dim() != 2 or token_node.shape[0] != n:
        raise ValueError(f"token_node must have shape [N={n}, T], got {tuple(token_node.shape)}")
    check_shapes("mask", mask, tuple(token_node.shape))
    mask = mask.bool().to(a.device)
    tn = token_node.to(a.device).long()
    row_vals = a[:, None].expand(tn.shape)
    has_node = tn >= 0
    if not bool(has_node.any()):
        return torch.where(mask, row_vals, torch.zeros_like(row_vals))
    rows = torch.arange(n, device=a.device)[:, None].expand(tn.shape)
    if group_ids is not None:
        check_shapes("group_ids", group_ids, (n,))
        g, _ = group_index(group_ids.to(a.device))
        key = torch.stack([g[:, None].expand(tn.shape)[has_node], tn[has_node]], dim=1)
    else:
        key = tn[has_node][:, None]
    _, node_idx = torch.unique(key, dim=0, return_inverse=True)
    k = int(node_idx.max()) + 1
    incidence = torch.zeros(n, k, dtype=torch.float64, device=a.device)
    incidence[rows[has_node], node_idx] = 1.0
    node_mean = (incidence.T @ a.to(torch.float64)) / incidence.sum(0)
    out = row_vals.clone()
    out[has_node] = node_mean[node_idx].to(a.dtype)
    return torch.where(mask, out, torch.zeros_like(out))


# --------------------------------------------------------------------------- AEPO entropy-aware advantage


def entropy_aware(
    adv: Tensor,
    entropy: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    alpha_h: float = 0.2,
    *,
    eps: float = 1e-6,
    std: str = "unb",
    scope: str = "group",
    clamp: bool = True,
) -> Tensor:
    """Entropy-aware token advantage of agentic AEPO (arXiv 2510.14545; ``docs/algorithms.md``).

    ``z_{i,t} = (H_{i,t} - mean_g H) / (std_g H + eps)`` over the valid tokens of the row's group (each
    replicated copy counts), ``A^_{i,t} = A_{i,t} max(0, 1 + alpha_h z_{i,t})``: high-entropy tokens are
    up-weighted, low-entropy ones down-weighted, a sign is never flipped. A group with fewer than two valid
    tokens has std 0, so z = 0. ``alpha_h = 0`` gives back ``adv``.

    The paper gives no formula; every detail is a design choice of ours ([UNVERIFIED]), kept as options:
    the form itself, ``std`` ("unb" n-1, default; "pop" n), ``scope`` ("group", default; "batch" pools all
    tokens), ``clamp`` (True: the ``max(0, .)``; False lets a very low-entropy token flip its sign), eps 1e-6.
    ``entropy`` is pi_old's full-vocabulary entropy (detached).

    adv [N, T] or [N], entropy [N, T], mask [N, T] bool, group_ids [N] -> [N, T] (0 on masked cells)
    """
    _check_choice("std", std, _STD_MODES)
    _check_choice("scope", scope, _SCOPES)
    _check_bool("clamp", clamp)
    _check_positive("eps", eps)
    bad_alpha = isinstance(alpha_h, bool) or not isinstance(alpha_h, (int, float))
    if bad_alpha or not (alpha_h >= 0 and math.isfinite(alpha_h)):
        raise ConfigError(f"alpha_h must be a number >= 0, got {alpha_h!r}")
    if entropy.dim() != 2:
        raise ValueError(f"entropy must be 2-D [N, T], got shape {tuple(entropy.shape)}")
    check_shapes("mask", mask, tuple(entropy.shape))
    n = entropy.shape[0]
    check_shapes("group_ids", group_ids, (n,))
    a = as_float(adv).detach()
    if a.dim() == 1:
        check_shapes("adv", a, (n,))
        a = a[:, None].expand(entropy.shape)
    check_shapes("adv", a, tuple(entropy.shape))
    m = mask.bool().to(a.device)
    h = as_float(entropy).detach().to(device=a.device, dtype=torch.float64)
    if scope == "group":
        inv, g = group_index(group_ids.to(a.device))
    else:
        inv, g = torch.zeros(n, dtype=torch.long, device=a.device), 1
    cell_set = inv[:, None].expand(h.shape)[m]
    z = torch.zeros_like(h)
    if bool(m.any()):
        vals = h[m]
        mean, sd, count = group_mean_std(vals, cell_set, g, unbiased=std == "unb")
        sd = torch.where(count < 2, torch.zeros_like(sd), sd)
        z[m] = (vals - mean[cell_set]) / (sd[cell_set] + eps)
    factor = 1.0 + alpha_h * z
    if clamp:
        factor = factor.clamp_min(0.0)
    out = (a.to(torch.float64) * factor).to(a.dtype)
    return torch.where(m, out, torch.zeros_like(out))


# --------------------------------------------------------------------------- registered entries


def _row_rewards(rewards: Tensor, token_node: Tensor, mask: Tensor) -> Tensor:
    r = as_float(rewards).detach()
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(r.shape)}")
    if token_node.dim() != 2 or token_node.shape[0] != r.shape[0]:
        raise ValueError(f"token_node must have shape [N={r.shape[0]}, T], got {tuple(token_node.shape)}")
    check_shapes("mask", mask, tuple(token_node.shape))
    return r


@ADVANTAGES.register("tree_subgroup")
@_stateless
def tree_subgroup(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    token_node: Tensor,
    row_leaf: Tensor,
    mask: Tensor,
    weight: str = "average",
    skip_zero_std: bool = False,
    max_depth: int | None = None,
    whiten: bool = True,
    eps: float = 1e-6,
    whiten_eps: float = 1e-8,
) -> Tensor:
    """TreePO subtree-averaged advantage over replicated tree rows (TreePO, arXiv 2508.17445).

    Each row's path is rebuilt from ``token_node`` (its node ids in order) plus ``row_leaf``; then
    ``a_i`` = :func:`tree_subgroup_advantage` (``average``: ``a_i = mean_{G in S(i)} (R_i - mu(G))`` over
    the root group and every shared prefix group of >= 2 leaves; ``group_size``: ``|G|``-weighted), broadcast
    to the row's valid tokens and, with ``whiten=True`` (default, as TreePO), :func:`token_whiten` over all
    valid tokens of the batch: ``A^ = (a - m) / sqrt(v + whiten_eps)``. Options ``weight``, ``skip_zero_std``
    (tolerance ``eps``), ``max_depth`` as in :func:`tree_subgroup_advantage`. A batch of unbranched rows gives
    ``R - mean_g R`` (then whitened).

    rewards [N], group_ids [N], token_node [N, T] long, row_leaf [N] long, mask [N, T] bool -> [N, T]
    """
    _check_bool("whiten", whiten)
    _check_positive("whiten_eps", whiten_eps)
    r = _row_rewards(rewards, token_node, mask)
    paths = paths_from_token_node(token_node, row_leaf)
    a = tree_subgroup_advantage(
        r, paths, group_ids, weight=weight, skip_zero_std=skip_zero_std, max_depth=max_depth, eps=eps
    )
    m = mask.bool().to(r.device)
    if whiten:
        return token_whiten(a, m, eps=whiten_eps)
    tok = a[:, None].expand(m.shape)
    return torch.where(m, tok, torch.zeros_like(tok))


tree_subgroup.inputs = ("token_node", "row_leaf", "mask")


@ADVANTAGES.register("arpo_hard")
@_stateless
def arpo_hard(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    token_node: Tensor,
    mask: Tensor,
    eps: float = 1e-6,
    norm_by_std: bool = True,
) -> Tensor:
    """ARPO hard attribution (ARPO, arXiv 2507.19849): GRPO z-score per row, then the shared-mean rule.

    ``A_i = (R_i - mean_g R) / (std_g R + eps)`` (unbiased std, eps 1e-6; ``norm_by_std=False``: no std),
    then every token of node v gets ``(1/|S_v|) sum_{j in S_v} A_j`` over the rows S_v through v
    (:func:`shared_mean_attribution`); branch-specific tokens keep ``A_i``. [UNVERIFIED] hard-form
    normalisation. ARPO's default soft attribution is plain ``grpo``.

    rewards [N], group_ids [N], token_node [N, T] long, mask [N, T] bool -> [N, T]
    """
    _check_positive("eps", eps)
    _check_bool("norm_by_std", norm_by_std)
    r = _row_rewards(rewards, token_node, mask)
    row_adv = grpo(r, group_ids, eps=eps, norm_by_std=norm_by_std)
    return shared_mean_attribution(row_adv, token_node, mask, group_ids)


arpo_hard.inputs = ("token_node", "mask")


@ADVANTAGES.register("aepo_agent")
@_stateless
def aepo_agent(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    entropy: Tensor,
    mask: Tensor,
    alpha_h: float = 0.2,
    eps: float = 1e-6,
    z_eps: float = 1e-6,
    std: str = "unb",
    scope: str = "group",
    clamp: bool = True,
) -> Tensor:
    """Agentic AEPO entropy-aware advantage (arXiv 2510.14545); not ARES's ``aepo``.

    GRPO ``A_i = (R_i - mean_g R) / (std_g R + eps)`` (soft attribution, as ARPO), then
    ``A^_{i,t} = A_i max(0, 1 + alpha_h z_{i,t})`` with ``z = (H - mean_g H) / (std_g H + z_eps)`` over the
    group's valid tokens of pi_old's entropy H (:func:`entropy_aware`). alpha_h 0.2; the form and every
    option (``std``, ``scope``, ``clamp``) are [UNVERIFIED] design choices, not the paper's published method.
    Pair with the ``ce_gppo`` loss (beta1=0, beta2=1, eps_high 0.28, dual_clip 3).

    rewards [N], group_ids [N], entropy [N, T], mask [N, T] bool -> [N, T]
    """
    _check_positive("eps", eps)
    row_adv = grpo(rewards, group_ids, eps=eps)
    return entropy_aware(row_adv, entropy, mask, group_ids, alpha_h, eps=z_eps, std=std, scope=scope, clamp=clamp)


aepo_agent.inputs = ("entropy", "mask")


__all__ = [
    "aepo_agent",
    "arpo_hard",
    "entropy_aware",
    "paths_from_token_node",
    "scatter_node_values",
    "shared_mean_attribution",
    "token_whiten",
    "tree_node_values",
    "tree_segment_advantage",
    "tree_subgroup",
    "tree_subgroup_advantage",
]
