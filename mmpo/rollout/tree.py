"""Rollout trees: the data structure of branching rollouts (TreePO, LATR, ARPO, AEPO).

A group's rollouts form a tree whose root is the prompt; every other node holds a contiguous
run of tokens appended to its parent's context, and each finished leaf is one trajectory.
**A fork closes the current node**: the continuing row and every new row start fresh child
nodes, so the tokens of node v are shared by exactly the leaves of v's subtree (see
``docs/algorithms.md``, branching rollouts; TreePO arXiv 2508.17445, LATR arXiv 2510.24302).

``Forest.materialise`` turns leaves into replicated rows (one row per leaf, every shared token
repeated in each row through it), the layout every reference implementation trains on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["BudgetError", "Forest", "Node", "TreeRows", "fallback_cut"]

#: statuses of a leaf that ended (a trajectory with a reward)
LEAF_STATUSES = ("finished", "truncated")


class BudgetError(ValueError):
    """A fork or rewind would give a group more rows (finished leaves + live rows) than its budget."""


@dataclass
class Node:
    """One node of a rollout tree (§9.2 of the branching-rollout design).

    ``depth`` counts branchable units on the path (segments / turns; the root is 0); ``kind`` is
    root | segment | turn | token_branch | fallback. Per token: ``token_ids``, ``action_mask``
    (sampled or forced by the policy; observations False), ``forced`` (chosen by a rule, not
    sampled from pi) and ``sample_logprobs`` (the sampler's log-prob of the token).
    """

    id: int
    group_id: int
    parent_id: int | None
    children: list[int]
    depth: int
    kind: str
    token_ids: list[int]
    action_mask: list[bool]
    forced: list[bool]
    sample_logprobs: list[float]
    status: str = "active"  # active | finished | pruned | truncated
    finish_reason: str | None = None
    reward: float | None = None
    info: dict = field(default_factory=dict)


@dataclass
class TreeRows:
    """Replicated rows, one per leaf (response part only; prompts are per group).

    completion_ids [N, T] long (``pad_id`` after each row's tokens), mask [N, T] bool (action
    tokens), forced [N, T] bool, token_node [N, T] long (node id of each token, -1 on padding),
    row_group [N] long, row_leaf [N] long, leaf_paths (node ids, root excluded, per row),
    sample_logprobs [N, T] float32 (0 where forced or padding).
    """

    completion_ids: Tensor
    mask: Tensor
    forced: Tensor
    token_node: Tensor
    row_group: Tensor
    row_leaf: Tensor
    leaf_paths: list[list[int]]
    sample_logprobs: Tensor

    def __len__(self) -> int:
        return len(self.leaf_paths)

    @property
    def lengths(self) -> Tensor:
        """Tokens per row ``[N]`` (padding excluded)."""
        return (self.token_node >= 0).sum(1)


class Forest:
    """The rollout trees of a batch of groups, with per-group leaf budgets.

    Args:
        budgets: ``{group_id: n}``, the most leaves a group may end with (finished leaves plus
            live rows are checked at every fork / rewind); groups not named have no budget.
    """

    def __init__(self, budgets: dict[int, int] | None = None) -> None:
        self.nodes: dict[int, Node] = {}
        self.roots: dict[int, int] = {}  # group id -> root node id, in creation order
        self.budgets: dict[int, int] = dict(budgets or {})
        self._next = 0

    # -- construction ------------------------------------------------------------------------
    def _new(self, group_id: int, parent_id: int | None, depth: int, kind: str) -> int:
        nid = self._next
        self._next += 1
        self.nodes[nid] = Node(nid, group_id, parent_id, [], depth, kind, [], [], [], [])
        if parent_id is not None:
            self.nodes[parent_id].children.append(nid)
        return nid

    def add_root(self, group_id: int) -> int:
        """The root (the prompt) of group ``group_id``; one per group."""
        if group_id in self.roots:
            raise ValueError(f"group {group_id} already has a root (node {self.roots[group_id]})")
        nid = self._new(group_id, None, 0, "root")
        self.roots[group_id] = nid
        return nid

    def add_child(self, parent_id: int, kind: str = "segment") -> int:
        """A new live child of ``parent_id`` (depth + 1), e.g. a first row of a group."""
        p = self.nodes[parent_id]
        return self._new(p.group_id, parent_id, p.depth + 1, kind)

    def append(
        self, node_id: int, token_id: int, *, action: bool = True, forced: bool = False, logprob: float = 0.0
    ) -> None:
        """Append one token to a live node."""
        node = self.nodes[node_id]
        if node.status != "active" or node.children:
            raise ValueError(f"node {node_id} is closed ({node.status}, {len(node.children)} children)")
        node.token_ids.append(int(token_id))
        node.action_mask.append(bool(action))
        node.forced.append(bool(forced))
        node.sample_logprobs.append(float(logprob))

    # -- budget ------------------------------------------------------------------------------
    def live(self, group_id: int | None = None) -> list[int]:
        """Live rows: active, non-root nodes without children (creation order)."""
        return [
            n.id
            for n in self.nodes.values()
            if n.status == "active"
            and not n.children
            and n.parent_id is not None
            and (group_id is None or n.group_id == group_id)
        ]

    def rows_in_use(self, group_id: int) -> int:
        """Finished leaves + live rows of a group: what its budget bounds."""
        return len(self.leaves(group_id)) + len(self.live(group_id))

    def can_add(self, group_id: int, k: int) -> bool:
        """Whether ``k`` more rows fit the group's budget."""
        n = self.budgets.get(group_id)
        return k <= 0 or n is None or self.rows_in_use(group_id) + k <= n

    def _check_budget(self, group_id: int, k: int, overshoot: bool) -> None:
        if not overshoot and not self.can_add(group_id, k):
            raise BudgetError(
                f"group {group_id}: {k} more rows would exceed its budget of {self.budgets[group_id]} "
                f"({self.rows_in_use(group_id)} finished leaves + live rows)"
            )

    # -- operations --------------------------------------------------------------------------
    def fork(self, node_id: int, k: int, kind: str = "segment", *, overshoot: bool = False) -> list[int]:
        """Close ``node_id`` and give it ``k + 1`` children: ``[0]`` is the continuing row, the
        others are ``k`` new rows. ``k = 0`` just starts a new unit (e.g. the next segment).
        Raises :class:`BudgetError` when ``k`` new rows exceed the group's budget, unless
        ``overshoot`` (TreePO's "every live path continues" is the one allowed overshoot)."""
        node = self.nodes[node_id]
        if node.status != "active" or node.children:
            raise ValueError(f"node {node_id} cannot fork: it is {node.status} with {len(node.children)} children")
        if k < 0:
            raise ValueError(f"fork needs k >= 0, got {k}")
        self._check_budget(node.group_id, k, overshoot)
        return [self.add_child(node_id, kind) for _ in range(k + 1)]

    def finish(self, node_id: int, reason: str, *, truncated: bool = False) -> None:
        """Make a live node a leaf (``truncated``: it ended at a length / depth limit, no EOS)."""
        node = self.nodes[node_id]
        if node.status != "active" or node.children:
            raise ValueError(f"node {node_id} cannot finish: it is {node.status} with {len(node.children)} children")
        node.status = "truncated" if truncated else "finished"
        node.finish_reason = reason

    def prune(self, node_id: int) -> None:
        """Mark the node and its whole subtree pruned (their rows leave the batch)."""
        stack = [node_id]
        while stack:
            n = self.nodes[stack.pop()]
            n.status = "pruned"
            stack.extend(n.children)

    def split(self, node_id: int, offset: int) -> int:
        """Split a node after its first ``offset`` tokens: a new node takes those tokens and the
        node's place under its parent; the node keeps the rest (and its id, children and
        status). Returns the new (prefix) node's id."""
        v = self.nodes[node_id]
        if not 0 < offset < len(v.token_ids) or v.parent_id is None:
            raise ValueError(f"cannot split node {node_id} ({len(v.token_ids)} tokens) at {offset}")
        u = self._new(v.group_id, None, v.depth, v.kind)
        un = self.nodes[u]
        un.parent_id = v.parent_id
        siblings = self.nodes[v.parent_id].children
        siblings[siblings.index(node_id)] = u
        un.children = [node_id]
        un.status = "active"
        for name in ("token_ids", "action_mask", "forced", "sample_logprobs"):
            seq = getattr(v, name)
            setattr(un, name, seq[:offset])
            setattr(v, name, seq[offset:])
        v.parent_id = u
        return u

    def rewind(self, leaf: int, cut: int, k: int, kind: str = "fallback", *, overshoot: bool = False) -> list[int]:
        """``k`` new live rows whose context is ``leaf``'s response truncated to ``cut`` tokens
        (TreePO fallback). A cut inside a node splits it first, so the tree stays exact; a cut
        of 0 gives new children of the root. Returns the new node ids."""
        node = self.nodes[leaf]
        self._check_budget(node.group_id, k, overshoot)
        total = sum(len(self.nodes[i].token_ids) for i in self.path(leaf))
        if not 0 <= cut <= total:
            raise ValueError(f"cut {cut} outside leaf {leaf}'s {total} tokens")
        anchor = self.roots[node.group_id]
        pos = 0
        for nid in self.path(leaf):
            if pos == cut:
                break
            n_len = len(self.nodes[nid].token_ids)
            if pos + n_len <= cut:
                anchor, pos = nid, pos + n_len
            else:
                anchor = self.split(nid, cut - pos)
                break
        return [self.add_child(anchor, kind) for _ in range(k)]

    # -- queries -----------------------------------------------------------------------------
    def path(self, leaf: int) -> list[int]:
        """Node ids from the root's child down to ``leaf`` (root excluded)."""
        out = []
        nid: int | None = leaf
        while nid is not None and self.nodes[nid].parent_id is not None:
            out.append(nid)
            nid = self.nodes[nid].parent_id
        return out[::-1]

    def leaves(self, group_id: int | None = None) -> list[int]:
        """Finished (or truncated) leaves: group-major (groups in root order), creation order within a group."""
        groups = [group_id] if group_id is not None else list(self.roots)
        out = []
        for g in groups:
            out += [
                n.id for n in self.nodes.values() if n.group_id == g and n.status in LEAF_STATUSES and not n.children
            ]
        return out

    def subtree_leaves(self, node_id: int) -> list[int]:
        """Finished leaves in the subtree of ``node_id`` (creation order)."""
        found, stack = set(), [node_id]
        while stack:
            n = self.nodes[stack.pop()]
            if n.status in LEAF_STATUSES and not n.children:
                found.add(n.id)
            stack.extend(n.children)
        return sorted(found)

    def context_tokens(self, node_id: int) -> list[int]:
        """Response tokens on the path up to and including ``node_id``."""
        return [t for nid in self.path(node_id) for t in self.nodes[nid].token_ids]

    def truncated(self, leaves: list[int] | None = None) -> Tensor:
        """``[N]`` bool: the leaf ended at a length / depth / repetition limit, without EOS."""
        leaves = self.leaves() if leaves is None else list(leaves)
        return torch.tensor([self.nodes[i].status == "truncated" for i in leaves], dtype=torch.bool)

    def decoded_tokens(self) -> int:
        """Tokens held by the nodes (each shared token once; copies made by a fill excluded)."""
        return sum(len(n.token_ids) for n in self.nodes.values() if "copy_of" not in n.info)

    def materialise(self, pad_id: int, leaves: list[int] | None = None) -> TreeRows:
        """One row per leaf (default: all leaves, group-major). See :class:`TreeRows`."""
        leaves = self.leaves() if leaves is None else list(leaves)
        paths = [self.path(leaf) for leaf in leaves]
        lengths = [sum(len(self.nodes[i].token_ids) for i in p) for p in paths]
        N, T = len(leaves), max([1, *lengths])
        ids = torch.full((N, T), pad_id, dtype=torch.long)
        mask = torch.zeros(N, T, dtype=torch.bool)
        forced = torch.zeros(N, T, dtype=torch.bool)
        token_node = torch.full((N, T), -1, dtype=torch.long)
        logps = torch.zeros(N, T, dtype=torch.float32)
        for r, p in enumerate(paths):
            col = 0
            for nid in p:
                n = self.nodes[nid]
                L = len(n.token_ids)
                if L:
                    ids[r, col : col + L] = torch.tensor(n.token_ids)
                    mask[r, col : col + L] = torch.tensor(n.action_mask)
                    forced[r, col : col + L] = torch.tensor(n.forced)
                    token_node[r, col : col + L] = nid
                    logps[r, col : col + L] = torch.tensor(n.sample_logprobs, dtype=torch.float32)
                col += L
        logps = logps.masked_fill(forced | ~mask, 0.0)
        return TreeRows(
            completion_ids=ids,
            mask=mask,
            forced=forced,
            token_node=token_node,
            row_group=torch.tensor([self.nodes[i].group_id for i in leaves], dtype=torch.long),
            row_leaf=torch.tensor(leaves, dtype=torch.long),
            leaf_paths=paths,
            sample_logprobs=logps,
        )


def fallback_cut(length: int, segment_length: int, b: int) -> tuple[int, int]:
    """TreePO's random-boundary fallback cut (arXiv 2508.17445): with ``B = ceil(length / S)``
    blocks and a draw ``b`` in ``1..B``, cut ``c = (B - b) * S`` response tokens, leaving depth
    ``ceil(c / S)``. Returns ``(cut, depth)``; always a multiple of S, so node boundaries and
    token positions agree."""
    S = int(segment_length)
    if S <= 0:
        raise ValueError(f"segment_length must be > 0, got {segment_length}")
    B = max(1, math.ceil(length / S))
    if not 1 <= b <= B:
        raise ValueError(f"draw b={b} outside 1..{B} (length {length}, S {S})")
    cut = (B - b) * S
    return cut, math.ceil(cut / S)
