"""Tree rollouts: a group's rows branch inside one batched KV-cache sampling loop.

The loop generalises the hf engine's (:mod:`mmpo.rollout.engines.hf`): prompts are prefilled
once and their cache gathered to the first rows; at any step a row can **fork** (its cache row
gathered k more times, as for a prompt's G rows; optionally with forced first tokens, LATR),
**finish** or be **killed** (its cache row dropped, as at EOS). Each token is therefore decoded
once for all the leaves that share it. A **rewind** (TreePO's fallback) re-prefills a leaf's
truncated context, once per rewind, in the next wave: a wave is one run of the loop, and a
group whose rows all ended waits for the current wave to end before its rewound rows start
(scheduling only; every row is still sampled from the policy).

Branching is decided by a hook object (:mod:`mmpo.rollout.branching`: TreePO arXiv 2508.17445,
LATR arXiv 2510.24302). The output is a :class:`~mmpo.rollout.tree.Forest` per batch, its
replicated rows (:class:`~mmpo.rollout.tree.TreeRows`, one per leaf) and counters:
``decoded_tokens`` (tokens held by the tree's nodes: each shared token once) and
``leaf_tokens`` (sum of the leaves' response lengths, what independent rows would decode).
See ``docs/algorithms.md``, branching rollouts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from mmpo.errors import ConfigError
from mmpo.policies.batching import to_device
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.policies.kv_cache import preallocated_cache
from mmpo.rollout.branching import BranchingPolicy, GroupView, Row, build_branching_policy
from mmpo.rollout.engines.base import GenerationSettings
from mmpo.rollout.engines.hf import _sample
from mmpo.rollout.tree import Forest, TreeRows

__all__ = ["TreeEngine", "tree_generate"]


@dataclass
class _Unit:
    """Rows that start from one context: prompt ``group`` + response ``prefix`` (one prefill)."""

    group: int
    prefix: list[int]
    rows: list[Row] = field(default_factory=list)


class TreeEngine:
    """Samples a forest per batch of prompts with live rows batched in one KV-cache loop.

    Args:
        policy: the ``CausalLMPolicy`` (special ids, prefill, positions).
        max_live_rows: most rows decoded at once (memory cap): boundary forks and LATR branches
            beyond it are refused (TreePO's fallback later refills the group); the first rows of
            a wave and LATR's exit fill (which restores n rows per group) are not capped. None: no cap.
        max_waves: most loop runs (the first plus rewind waves) per batch.
    """

    def __init__(self, policy: CausalLMPolicy, *, max_live_rows: int | None = None, max_waves: int = 64) -> None:
        self.policy = policy
        self.max_live_rows = max_live_rows
        self.max_waves = int(max_waves)

    # -- public ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        prompt_inputs: dict[str, torch.Tensor],
        settings: GenerationSettings,
        branching: BranchingPolicy,
        *,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> tuple[Forest, TreeRows, dict[str, float]]:
        """Grow one tree per collated prompt (``input_ids [k, P]``, group ids 0..k-1).

        Returns the forest, its rows (group-major, creation order within a group) and stats
        (``decoded_tokens``, ``leaf_tokens``, ``forward_rows``: rows run through the decoder
        summed over steps, ``peak_rows``: most rows decoded at once, ``waves``, ``leaves``,
        ``refused_forks`` and the policy's own counters)."""
        was_training = model.training
        model.eval()
        try:
            return self._generate(model, to_device(prompt_inputs, device, dtype), settings, branching)
        finally:
            model.train(was_training)

    # -- internals ---------------------------------------------------------------------------
    def _generate(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], settings: GenerationSettings, br: BranchingPolicy
    ) -> tuple[Forest, TreeRows, dict[str, float]]:
        pol = self.policy
        tok = pol.tokenizer
        eos_set = set(pol.eos_token_ids)
        br.decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
        br.token_text = lambda t: tok.decode([t])
        br.is_eos = lambda toks: any(t in eos_set for t in toks)
        L_max = min(settings.max_new_tokens, br.max_tokens or settings.max_new_tokens)
        br.max_tokens = L_max
        k = inputs["input_ids"].shape[0]
        forest = Forest({g: br.budget(g) for g in range(k)})
        self._forest, self._br, self._finished_now = forest, br, {g: 0 for g in range(k)}
        self._stats = {"forward_rows": 0.0, "waves": 0.0, "refused_forks": 0.0, "peak_rows": 0.0}
        units = []
        for g in range(k):
            root = forest.add_root(g)
            unit = _Unit(g, [])
            for i in range(br.initial_children(g)):
                mode = br.initial_mode(g, i)
                nid = forest.add_child(root, "token_branch" if mode == "tree" else "segment")
                unit.rows.append(Row(nid, g, mode=mode, tree=mode == "tree", origin=nid))
            units.append(unit)
        for wave in range(self.max_waves):
            units = [u for u in units if u.rows]
            if not units:
                break
            self._stats["waves"] += 1
            self._run_wave(model, inputs, settings, units, L_max)
            units = []
            for g in range(k if wave + 1 < self.max_waves else 0):
                for rw in br.on_group_idle(self._view(g, [])):
                    prefix = forest.context_tokens(rw.leaf)[: rw.cut]
                    new = forest.rewind(rw.leaf, rw.cut, rw.k)
                    anchor = forest.nodes[new[0]].parent_id
                    lp = sum(sum(forest.nodes[i].sample_logprobs) for i in forest.path(anchor))
                    unit = _Unit(g, prefix)
                    unit.rows = [Row(nid, g, tokens=list(prefix), logprob_sum=lp, origin=nid) for nid in new]
                    units.append(unit)
        rows = forest.materialise(pol.pad_token_id)
        stats = dict(self._stats)
        stats.update(
            decoded_tokens=float(forest.decoded_tokens()),
            leaf_tokens=float(rows.lengths.sum()),
            leaves=float(len(rows)),
            **{k2: float(v) for k2, v in br.stats.items()},
        )
        return forest, rows, stats

    def _view(self, g: int, rows: list[Row]) -> GroupView:
        f = self._forest
        return GroupView(g, [r for r in rows if r.group == g], f.leaves(g), self._finished_now[g], f.budgets[g], f)

    def _prefill(
        self, decoder: torch.nn.Module, inputs: dict[str, torch.Tensor], units: list[_Unit], reserve: int
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cache, mask ``[U, P(+C)]``, start ``[U]`` and last hidden ``[U, H]`` of each unit's context."""
        pol = self.policy
        groups = sorted({u.group for u in units})
        k = inputs["input_ids"].shape[0]
        if pol.is_vlm or groups == list(range(k)):  # VLM media are not split per prompt: prefill all
            sub, gmap = inputs, {g: g for g in range(k)}
        else:
            idx = torch.tensor(groups, device=inputs["input_ids"].device)
            sub = {name: v[idx] for name, v in inputs.items()}
            gmap = {g: i for i, g in enumerate(groups)}
        pre = pol.prefill(decoder, sub, cache=preallocated_cache(reserve))
        device = pre.mask.device
        src = torch.tensor([gmap[u.group] for u in units], device=device)
        cache = pre.cache
        if len(src) != pre.mask.shape[0] or not torch.equal(src, torch.arange(len(src), device=device)):
            cache.reorder_cache(src)
        mask, start, hidden = pre.mask[src], pre.start[src], pre.last_hidden[src]
        lens = torch.tensor([len(u.prefix) for u in units], device=device)
        C = int(lens.max())
        if C > 0:  # the prefixes, right-aligned: padding sits between prompt and prefix (masked)
            ids = torch.full((len(units), C), pol.pad_token_id, dtype=torch.long, device=device)
            cm = torch.zeros(len(units), C, dtype=mask.dtype, device=device)
            for i, u in enumerate(units):
                if u.prefix:
                    ids[i, C - len(u.prefix) :] = torch.tensor(u.prefix, device=device)
                    cm[i, C - len(u.prefix) :] = 1
            pos = (start[:, None] + torch.arange(C, device=device)[None, :] - (C - lens)[:, None]).clamp(min=0)
            if pol.is_vlm:
                pos = pos.unsqueeze(0).expand(3, -1, -1)
            mask = torch.cat([mask, cm], dim=1)
            out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            hidden = torch.where((lens > 0)[:, None], out.last_hidden_state[:, -1], hidden)
        return cache, mask, start, hidden

    def _run_wave(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        settings: GenerationSettings,
        units: list[_Unit],
        L_max: int,
    ) -> None:
        pol, br, forest = self.policy, self._br, self._forest
        decoder, head = pol._decoder_and_head(model)
        reserve = L_max + max(len(u.prefix) for u in units) + 1
        cache, umask, ustart, uhidden = self._prefill(decoder, inputs, units, reserve)
        device = umask.device
        rows = [r for u in units for r in u.rows]
        src = torch.tensor([i for i, u in enumerate(units) for _ in u.rows], device=device)
        if not torch.equal(src, torch.arange(len(units), device=device)):
            cache.reorder_cache(src)
        mask, start, hidden = umask[src], ustart[src], uhidden[src]
        self._stats["peak_rows"] = max(self._stats["peak_rows"], float(len(rows)))
        all_valid = bool(mask.all())
        never = torch.tensor(pol.never_sample_ids, dtype=torch.long, device=device)
        eos = torch.tensor(pol.eos_token_ids, dtype=torch.long, device=device)
        eos_set = set(pol.eos_token_ids)
        warpers = []
        if settings.top_k > 0:
            warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(settings.top_p))
        top_m = max(int(getattr(br, "m", 1)), 1)
        S = br.segment_length()
        for t in itertools.count():
            m = len(rows)
            logits = head(hidden).float()
            if never.numel():
                logits.index_fill_(-1, never, float("-inf"))
            token = torch.zeros(m, dtype=torch.long, device=device)
            logp = torch.zeros(m, dtype=torch.float32, device=device)
            s_idx = [i for i, r in enumerate(rows) if r.mode == "sample"]
            t_idx = [i for i, r in enumerate(rows) if r.mode != "sample"]
            if s_idx:
                sel = torch.tensor(s_idx, device=device)
                lg = logits if len(s_idx) == m else logits[sel]
                scaled = settings.scale(lg)
                logp_all = torch.log_softmax(scaled, dim=-1)
                short = torch.tensor([len(rows[i].tokens) < settings.min_new_tokens for i in s_idx], device=device)
                if bool(short.any()):
                    scaled = scaled.clone()
                    scaled[short[:, None] & torch.isin(torch.arange(scaled.shape[1], device=device), eos)[None]] = (
                        float("-inf")
                    )
                if settings.greedy:
                    tk = scaled.argmax(-1)
                else:
                    for warp in warpers:
                        scaled = warp(None, scaled)
                    tk = _sample(torch.softmax(scaled, dim=-1))
                token[sel] = tk
                logp[sel] = logp_all.gather(-1, tk[:, None]).squeeze(1)
            forks: dict[int, list[int]] = {}
            if t_idx:
                sel = torch.tensor(t_idx, device=device)
                raw = logits[sel]
                top_p, top_i = torch.softmax(raw, dim=-1).topk(top_m, dim=-1)
                tk = top_i[:, 0]
                tlogp = torch.log_softmax(raw / settings.temperature, dim=-1)
                token[sel] = tk
                logp[sel] = tlogp.gather(-1, tk[:, None]).squeeze(1)
                trows = [rows[i] for i in t_idx]
                groups = {g: self._view(g, rows) for g in {r.group for r in rows}}
                pos_of = {id(r): j for j, r in enumerate(trows)}
                room = None if self.max_live_rows is None else max(self.max_live_rows - m, 0)
                for r, ftok in br.on_token(trows, top_p, top_i, groups, t):
                    if room is not None and room <= 0:
                        self._stats["refused_forks"] += 1
                        continue
                    forks.setdefault(t_idx[pos_of[id(r)]], []).append(int(ftok))
                    room = None if room is None else room - 1
                flogp = {(i, ft): float(tlogp[t_idx.index(i), ft]) for i, fts in forks.items() for ft in fts}
            spawned: dict[int, list[Row]] = {}
            tok_l, logp_l = token.tolist(), logp.tolist()
            for i, r in enumerate(rows):
                if i in forks:
                    children = forest.fork(r.node, len(forks[i]), "token_branch")
                    r.node = children[0]
                    for nid, ft in zip(children[1:], forks[i]):
                        nr = Row(nid, r.group, mode=r.mode, tokens=list(r.tokens), logprob_sum=r.logprob_sum, parent=r)
                        nr.birth_step, nr.birth_pos, nr.tree, nr.origin = t, len(r.tokens), r.tree, nid
                        self._append(nr, ft, flogp[(i, ft)])
                        spawned.setdefault(i, []).append(nr)
                self._append(r, tok_l[i], logp_l[i])
            everyone = [(i, r) for i, r in enumerate(rows)] + [(i, nr) for i, lst in spawned.items() for nr in lst]
            for _, r in everyone:
                node = forest.nodes[r.node]
                res = br.should_stop(r, node, node.token_ids[-1] in eos_set, len(r.tokens) >= L_max)
                if res is not None:
                    node.info["tree"] = r.tree
                    forest.finish(r.node, res[0], truncated=res[1])
                    r.alive = False
                    self._finished_now[r.group] += 1
            live = [r for _, r in everyone if r.alive]
            for b in br.should_prune(live, t):
                forest.prune(b.origin)
            for _, r in everyone:
                if r.alive and forest.nodes[r.node].status == "pruned":
                    r.alive = False
            n_live = sum(r.alive for _, r in everyone)
            if S:  # segment boundaries: the group's live rows whose node is full get children
                at = [(i, r) for i, r in everyone if r.alive and len(forest.nodes[r.node].token_ids) >= S]
                for g in sorted({r.group for _, r in at}):
                    members = [(i, r) for i, r in at if r.group == g]
                    view = self._view(g, [r for _, r in members])
                    for (i, r), c in zip(members, br.on_boundary(view)):
                        extra = max(int(c) - 1, 0)
                        if self.max_live_rows is not None:
                            extra = min(extra, max(self.max_live_rows - n_live, 0))
                        while extra and not forest.can_add(g, extra):
                            extra -= 1
                        self._stats["refused_forks"] += max(int(c) - 1, 0) - extra
                        children = forest.fork(r.node, extra, "segment", overshoot=True)
                        r.node = children[0]
                        for nid in children[1:]:
                            nr = Row(nid, g, mode=r.mode, tokens=list(r.tokens), logprob_sum=r.logprob_sum, parent=r)
                            nr.origin = nid
                            spawned.setdefault(i, []).append(nr)
                        n_live += extra
                    self._finished_now[g] = 0
            live = [r for i, r in enumerate(rows) if r.alive] + [nr for lst in spawned.values() for nr in lst]
            fills = br.on_phase(t, {g: self._view(g, live) for g in sorted({r.group for r in rows})})
            if fills is not None:
                for target, kk in fills:
                    if isinstance(target, Row):
                        i = next((j for j, r in enumerate(rows) if r is target), None)
                        if i is None:  # spawned this step: its cache row is its parent's
                            i = next(j for j, lst in spawned.items() if any(x is target for x in lst))
                        children = forest.fork(target.node, kk, "token_branch")
                        target.node = children[0]
                        for nid in children[1:]:
                            nr = Row(nid, target.group, mode="sample", tokens=list(target.tokens), tree=True)
                            nr.parent, nr.origin = target, nid
                            spawned.setdefault(i, []).append(nr)
                    else:
                        self._duplicate_leaf(int(target), kk)
                for r in live:
                    r.mode = "sample"
                for lst in spawned.values():
                    for r in lst:
                        r.mode = "sample"
            order = []
            for i, r in enumerate(rows):
                if r.alive:
                    order.append((i, r))
                order += [(i, nr) for nr in spawned.get(i, []) if nr.alive]
            if not order:
                return
            sel = torch.tensor([i for i, _ in order], device=device)
            if len(order) != m or not torch.equal(sel, torch.arange(m, device=device)):
                cache.reorder_cache(sel)
                mask, start = mask[sel], start[sel]
            rows = [r for _, r in order]
            fed = torch.tensor([r.tokens[-1] for r in rows], dtype=torch.long, device=device)
            rlen = torch.tensor([len(r.tokens) for r in rows], dtype=torch.long, device=device)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            self._stats["forward_rows"] += len(rows)
            self._stats["peak_rows"] = max(self._stats["peak_rows"], float(len(rows)))
            hidden = decoder(
                input_ids=fed[:, None],
                attention_mask=None if all_valid else mask,
                position_ids=pol.continuation_positions(start + rlen - 1, 0, 1),
                cache=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]

    def _append(self, row: Row, token: int, logprob: float) -> None:
        forced = row.mode != "sample"
        self._forest.append(row.node, token, forced=forced, logprob=logprob)
        row.tokens.append(int(token))
        row.logprob_sum += logprob

    def _duplicate_leaf(self, leaf: int, k: int) -> None:
        """``k`` copies of a finished leaf as siblings (LATR fill when every tree row ended)."""
        f = self._forest
        src = f.nodes[leaf]
        for _ in range(k):
            nid = f.add_child(src.parent_id, src.kind)
            n = f.nodes[nid]
            n.token_ids, n.action_mask = list(src.token_ids), list(src.action_mask)
            n.forced, n.sample_logprobs = list(src.forced), list(src.sample_logprobs)
            n.status, n.finish_reason = src.status, src.finish_reason
            n.info.update(src.info, copy_of=leaf)


def tree_generate(
    policy: CausalLMPolicy,
    model: torch.nn.Module,
    prompt_inputs: dict[str, torch.Tensor],
    tree_cfg: dict[str, Any],
    settings: GenerationSettings,
    device: torch.device,
    *,
    group_size: int | None = None,
    step: int = 0,
    max_live_rows: int | None = None,
) -> tuple[Forest, TreeRows, dict[str, float]]:
    """Sample a forest for the collated prompts with the ``rollout.tree`` block ``tree_cfg``
    (``n`` defaults to ``group_size``; ``step`` drives LATR's mix-ratio schedule). Returns the
    forest, its replicated rows (group ``g`` = prompt ``g``) and the engine's counters."""
    n = tree_cfg.get("n") or group_size
    if not n:
        raise ConfigError(f"rollout.tree.n: leaves per group needed (or a group_size), got {tree_cfg.get('n')!r}")
    branching = build_branching_policy(tree_cfg, int(n), settings.max_new_tokens, step=step)
    engine = TreeEngine(policy, max_live_rows=max_live_rows)
    return engine.generate(model, prompt_inputs, settings, branching, device=device)
