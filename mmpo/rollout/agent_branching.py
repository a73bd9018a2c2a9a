"""Branching multi-turn agent rollouts: ARPO and agentic AEPO (see ``docs/algorithms.md``).

ARPO (Agentic Reinforced Policy Optimization, arXiv 2507.19849) starts each prompt with M
"global" rows and, right after a tool result has been appended to a live row, may copy that row
(a *branch*): siblings share everything up to and including the observation and differ from
their first sampled token after it. A branch is drawn with probability
``clip(beta + w * dH, 0, 1)``, ``dH`` the change of the chunk entropy (the entropy of the first
``k_H`` tokens of a generated chunk, from their top-10 log-probs, normalised by ``ln V``) against
the row's first chunk. A group never holds more than ``n`` rows; a group whose rows all ended
before reaching ``n`` gets fresh rows from the prompt ("refill"), so it ends with exactly ``n``.

Agentic AEPO (Agentic Entropy-Balanced Policy Optimization, arXiv 2510.14545; not ARES's "AEPO",
which this project registers as ``aepo``) adds (1) entropy pre-monitoring: one probe trajectory
per prompt measures ``H_root`` (first chunk) and ``H_tool`` (mean entropy of the chunks after
tool results) and sets the number of global rows ``m = clip(round(n * sigmoid(beta_m *
(H_root - H_tool))), 1, n)``; (2) a consecutive-branch penalty: the branch probability is
multiplied by ``rho ** l``, ``l`` the number of immediately preceding tool steps of the path that
branched. The formula of ``m`` comes from a secondary summary of the paper; where and how the
entropies are measured, the form of the penalty and all AEPO default values are this project's
design choices (options below), not the paper's stated method.

Engine. :class:`BranchingRollout` runs the rows of all groups in rounds, like
:meth:`mmpo.rollout.agent_loop.AgentLoop.run` (one engine call per round, tools run
concurrently), using the loop's own turn / tool / observation steps. A fork clones the row's
state (token list, masks, media references, tool counters) and opens fresh child nodes in a
:class:`mmpo.rollout.tree.Forest` (a fork closes the current node). Siblings share the already
encoded observation: the processor encodes it once, and at the next round the k+1 rows of a fork
are one prompt with ``num_samples = k + 1``, so the engine prefills that context once and gathers
its cache (the ``hf`` engine), as for the M rows of a prompt. The decisions are made in the main
thread after a round's tools returned, so the per-group budget needs no lock.

Every leaf is one row (one :class:`BranchedTrajectory`) of the update: ``trajectory_tensors`` of
the returned trajectories equals ``forest.materialise(pad_id, leaf_ids(trajs))`` (tokens and
action masks; observations masked out), so the GRPO core runs unchanged on replicated rows
("soft" attribution, ARPO's released code).

Differences from ARPO's reference code, kept from this project's agent loop: a turn ends at EOS
(not at a closing tool tag), a row ends at a turn cap (``max_turns``, no observation after the
last turn), at a truncated turn or at a turn with neither an answer nor a call; the chunk
entropy is recomputed by one forward of the model over the context (any engine), not read from
the sampler.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from mmpo.core.registry import Registry, did_you_mean
from mmpo.errors import ConfigError
from mmpo.rollout.agent_loop import AgentLoop, AgentTrajectory
from mmpo.rollout.engines.base import GenerationSettings
from mmpo.rollout.tools import ToolCall
from mmpo.rollout.tree import Forest

# ----------------------------------------------------------------------------- pure functions


def chunk_entropy(
    topk_logp: torch.Tensor, sampled_logp: torch.Tensor, vocab_size: int, *, reduce: str = "sum"
) -> float:
    """ARPO's chunk entropy (arXiv 2507.19849, ``docs/algorithms.md``) of one chunk's first
    positions: ``H = (1 / ln V) * sum_j sum_{x in top-K(j)} -p_x ln p_x``, the sampled token added
    at a position where it is outside the top K (as a sampler's top-K log-probs report it).

    Args:
        topk_logp: ``[L, K]`` log-probs of the K most likely tokens at each of the L positions.
        sampled_logp: ``[L]`` log-prob of the sampled token at each position.
        vocab_size: V (normalises by ``ln V``).
        reduce: ``"sum"`` over positions (ARPO's definition: short chunks have a smaller H) or
            ``"mean"`` (per position; an option).
    """
    if reduce not in ("sum", "mean"):
        raise ConfigError(f"entropy_reduce: {reduce!r} is not one of 'sum', 'mean'")
    if topk_logp.shape[0] == 0:
        return 0.0
    lp = topk_logp.double()
    p = lp.exp()
    per_pos = -(p * lp.masked_fill(p == 0, 0.0)).sum(-1)  # [L]
    s = sampled_logp.double()
    outside = s < lp[:, -1]  # strictly below the K-th candidate: not among the top K
    ps = s.exp()
    per_pos = per_pos + torch.where(outside & (ps > 0), -ps * s, torch.zeros_like(s))
    total = float(per_pos.sum()) / math.log(vocab_size)
    return total / len(per_pos) if reduce == "mean" else total


def arpo_branch_probability(delta_h: float, beta: float = 0.5, w: float = 0.2) -> float:
    """``clip(beta + w * delta_h, 0, 1)``: the probability that :func:`arpo_branch` branches."""
    return min(1.0, max(0.0, beta + w * delta_h))


def arpo_branch(u: float, delta_h: float, beta: float = 0.5, w: float = 0.2) -> bool:
    """ARPO's stochastic rule (reference code): ``p = clip(u - w * delta_h, 0, 1)``, branch iff
    ``p <= beta``, for a draw ``u ~ U[0, 1)``. Marginally ``P(branch) = clip(beta + w dH, 0, 1)``."""
    return min(1.0, max(0.0, u - w * delta_h)) <= beta


def aepo_branch_probability(
    delta_h: float, consecutive: int, alpha: float = 0.5, gamma: float = 0.2, rho: float = 0.5
) -> float:
    """AEPO's penalised branch probability ``clip((alpha + gamma * delta_h) * rho ** l, 0, 1)``,
    ``l = consecutive`` (the form of the penalty is this project's choice; ``rho = 1`` is ARPO)."""
    return min(1.0, max(0.0, (alpha + gamma * delta_h) * rho**consecutive))


def aepo_global_rows(h_root: float, h_tool: float, n: int, beta_m: float = 1.0) -> int:
    """Entropy pre-monitoring: ``m = clip(round(n * sigmoid(beta_m * (h_root - h_tool))), 1, n)``
    global rows (round half up); ``n - m`` rows are left to branches."""
    x = beta_m * (h_root - h_tool)
    sig = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    return int(min(n, max(1, math.floor(n * sig + 0.5))))


# ----------------------------------------------------------------------------- policies


@dataclass
class RowView:
    """What a policy sees of a live row right after a tool result was appended to it."""

    node: int  # its current node in the forest (it ends with the observation; a fork closes it)
    group: int
    turns: int  # turns generated so far
    tool_calls: int
    chunk_entropy: float | None  # of the chunk just generated (the one that made the call)
    initial_entropy: float | None  # of the row's first chunk (ARPO's H_init)
    consecutive_branches: int  # immediately preceding tool steps of the path that branched
    budget_left: int  # n minus the rows the group holds (live, finished or about to start)


#: name -> branching-policy class (``arpo``, ``aepo_agent``)
BRANCHING_POLICIES: Registry[Callable[..., "BranchingPolicy"]] = Registry("branching policy")


def _check(cond: bool, option: str, value: Any, what: str) -> None:
    if not cond:
        raise ConfigError(f"{option}: {value!r} {what}")


class BranchingPolicy:
    """Hooks of the branching agent loop (``docs/algorithms.md``, branching rollouts).

    Args:
        n: leaves (rows) per group, the group's budget.
        max_live_rows: cap on rows generating at once over all groups (0: none); forks and new
            rows wait for room.
        refill: a group with no live row and fewer than n rows gets ``"one"`` new row from the
            prompt per round (ARPO) or ``"all"`` missing rows at once (faster; a design choice).
        entropy_tokens: k_H, positions of a chunk its entropy is measured on.
        top_k: candidates per position in the chunk entropy.
        entropy_reduce: ``"sum"`` over positions (ARPO) or ``"mean"``.
        seed: seed of the policy's draws (None: drawn from torch's generator, so a seeded run
            is reproducible).
    """

    name: ClassVar[str] = ""
    #: whether the loop must measure chunk entropies
    needs_entropy: ClassVar[bool] = False

    def __init__(
        self,
        n: int,
        *,
        max_live_rows: int = 0,
        refill: str = "one",
        entropy_tokens: int = 20,
        top_k: int = 10,
        entropy_reduce: str = "sum",
        seed: int | None = None,
    ) -> None:
        _check(isinstance(n, int) and n >= 1, "n", n, "must be an integer >= 1 (rows per group)")
        _check(isinstance(max_live_rows, int) and max_live_rows >= 0, "max_live_rows", max_live_rows, "must be >= 0")
        _check(refill in ("one", "all"), "refill", refill, "is not one of 'one', 'all'")
        _check(
            isinstance(entropy_tokens, int) and entropy_tokens >= 1, "entropy_tokens", entropy_tokens, "must be >= 1"
        )
        _check(isinstance(top_k, int) and top_k >= 1, "top_k", top_k, "must be >= 1")
        _check(entropy_reduce in ("sum", "mean"), "entropy_reduce", entropy_reduce, "is not one of 'sum', 'mean'")
        self.n = n
        self.max_live_rows = max_live_rows
        self.refill = refill
        self.entropy_tokens = entropy_tokens
        self.top_k = top_k
        self.entropy_reduce = entropy_reduce
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.rng = random.Random(seed)

    def probe(self) -> bool:
        """True: run one probe row per group first and size the group with :meth:`global_rows`."""
        return False

    def initial_children(self, group: int) -> int:
        """Rows started from the prompt of ``group`` (without a probe)."""
        return self.n

    def global_rows(self, h_root: float, h_tool: float) -> int:
        """Global rows of a group after its probe (probe included)."""
        return self.n

    def on_observation(self, row: RowView) -> int:
        """Extra rows to fork from ``row`` now (the loop caps it by the budget and the live cap)."""
        return 0


@BRANCHING_POLICIES.register("arpo")
class ARPOPolicy(BranchingPolicy):
    """ARPO's entropy-triggered branching (arXiv 2507.19849).

    Args:
        n: rows per group (the scripts: 16).
        initial: M global rows per group (the scripts: 8; None: n, the code default).
        beam: b; at most ``b - 1`` extra rows per row and tool result (the scripts: 2).
        beta: ``branch_probability`` (0.5).
        w: ``entropy_weight`` (0.2 in the scripts).
        branch_initial_entropy: ``"own"`` (a branch's H_init is its own first chunk, as the
            reference code; its first decision has dH = 0) or ``"inherit"`` (the source row's; a
            design choice).
        **kw: see :class:`BranchingPolicy` (``entropy_tokens`` 20, ``top_k`` 10, ...).
    """

    name = "arpo"
    needs_entropy = True

    def __init__(
        self,
        n: int,
        initial: int | None = None,
        *,
        beam: int = 2,
        beta: float = 0.5,
        w: float = 0.2,
        branch_initial_entropy: str = "own",
        **kw: Any,
    ) -> None:
        super().__init__(n, **kw)
        initial = n if initial is None else initial
        _check(isinstance(initial, int) and 1 <= initial <= n, "initial", initial, f"must be an integer in [1, n={n}]")
        _check(isinstance(beam, int) and beam >= 1, "beam", beam, "must be an integer >= 1 (1: no branching)")
        _check(0.0 <= beta <= 1.0, "beta", beta, "must be in [0, 1]")
        _check(math.isfinite(w), "w", w, "must be finite")
        _check(
            branch_initial_entropy in ("own", "inherit"),
            "branch_initial_entropy",
            branch_initial_entropy,
            "is not one of 'own', 'inherit'",
        )
        self.initial = initial
        self.beam = beam
        self.beta = beta
        self.w = w
        self.branch_initial_entropy = branch_initial_entropy

    def initial_children(self, group: int) -> int:
        return self.initial

    def _branches(self, row: RowView) -> bool:
        u = self.rng.random()
        return arpo_branch(u, _delta_h(row), self.beta, self.w)

    def on_observation(self, row: RowView) -> int:
        """Up to ``beam - 1`` draws while the group has budget; each success is one extra row."""
        k, left = 0, row.budget_left
        for _ in range(self.beam - 1):
            if left <= 0:
                break
            if self._branches(row):
                k, left = k + 1, left - 1
        return k


@BRANCHING_POLICIES.register("aepo_agent")
class AEPOPolicy(ARPOPolicy):
    """Agentic AEPO's rollout (arXiv 2510.14545): ARPO plus entropy pre-monitoring and the
    consecutive-branch penalty. ``alpha``/``gamma`` are ARPO's ``beta``/``w``.

    Args:
        n: rows per group (k; 16, as ARPO — this project's default choice).
        probe: run a probe row per prompt to set the global rows m (True); False: ``initial``.
        beta_m: pre-monitoring sensitivity (1.0, a design choice).
        keep_probe: the probe is one of the m global rows (True, a design choice) or is dropped.
        alpha, gamma: base probability and entropy weight (0.5, 0.2, ARPO's).
        rho: consecutive-branch penalty factor in [0, 1] (0.5, a design choice; 1 = ARPO).
        **kw: see :class:`ARPOPolicy` (``beam`` 2, ...).
    """

    name = "aepo_agent"

    def __init__(
        self,
        n: int,
        initial: int | None = None,
        *,
        probe: bool = True,
        beta_m: float = 1.0,
        keep_probe: bool = True,
        alpha: float = 0.5,
        gamma: float = 0.2,
        rho: float = 0.5,
        **kw: Any,
    ) -> None:
        for bad in ("beta", "w"):
            _check(bad not in kw, bad, kw.get(bad), "is ARPO's name; AEPO's are 'alpha' and 'gamma'")
        super().__init__(n, initial, beta=min(1.0, max(0.0, alpha)), w=gamma, **kw)
        _check(math.isfinite(alpha), "alpha", alpha, "must be finite")
        _check(0.0 <= rho <= 1.0, "rho", rho, "must be in [0, 1]")
        _check(math.isfinite(beta_m), "beta_m", beta_m, "must be finite")
        self.use_probe = bool(probe)
        self.beta_m = beta_m
        self.keep_probe = bool(keep_probe)
        self.alpha, self.gamma, self.rho = alpha, gamma, rho

    def probe(self) -> bool:
        return self.use_probe

    def global_rows(self, h_root: float, h_tool: float) -> int:
        return aepo_global_rows(h_root, h_tool, self.n, self.beta_m)

    def _branches(self, row: RowView) -> bool:
        # u <= (alpha + gamma dH) rho^l, unclipped: with rho = 1 the same draws give ARPO's decisions
        u = self.rng.random()
        return u <= (self.alpha + self.gamma * _delta_h(row)) * self.rho**row.consecutive_branches


def _delta_h(row: RowView) -> float:
    if row.chunk_entropy is None or row.initial_entropy is None:
        return 0.0
    return row.chunk_entropy - row.initial_entropy


def build_branching_policy(name: str, n: int, options: dict[str, Any] | None = None) -> BranchingPolicy:
    """The registered policy ``name`` (``arpo`` / ``aepo_agent``) for groups of ``n`` rows;
    ``options`` are its keyword arguments (unknown ones raise ConfigError naming them)."""
    import inspect

    cls = BRANCHING_POLICIES.get(name)
    options = dict(options or {})
    valid: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        valid |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "n", "kw")}
    for key in options:
        if key not in valid:
            raise ConfigError(
                f"{name}.{key}: unknown option of the {name} branching policy.{did_you_mean(key, sorted(valid))} "
                f"Valid options: {', '.join(sorted(valid))}."
            )
    return cls(n, **options)


# ----------------------------------------------------------------------------- the loop


@dataclass
class BranchedTrajectory(AgentTrajectory):
    """An agent trajectory that is one leaf of a branching rollout: its ``group``, its
    ``leaf_id`` in the forest, the round it first generated in (``born_round``, from 1), whether it was
    forked (``forked``) or started from the prompt, and whether it is AEPO's ``probe``."""

    group: int = -1
    leaf_id: int = -1
    born_round: int = 0
    forked: bool = False
    probe: bool = False


def leaf_ids(trajs: Sequence[BranchedTrajectory]) -> list[int]:
    """The forest leaf of each trajectory (for ``Forest.materialise(pad_id, leaves=...)``)."""
    return [t.leaf_id for t in trajs]


@dataclass
class _Row:
    traj: BranchedTrajectory
    node: int
    share: Any  # rows with equal keys have the same context (a fork not generated yet)
    h_init: float | None = None
    chunk_h: float | None = None
    consecutive: int = 0
    serial: int = 0  # creation order
    entropies: list[float] = field(default_factory=list)
    # set by the round: the tokens just generated
    last_len: int = 0


def _vocab_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "out_features", None):
        return int(head.out_features)
    cfg = model.config
    return int(getattr(cfg, "vocab_size", None) or cfg.text_config.vocab_size)


def _cut(enc: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """``enc`` with its token tensors cut to the first ``length`` tokens (media kept: the cut
    only drops sampled tokens, which are never image tokens)."""
    out = dict(enc)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in out:
            out[key] = out[key][:, :length]
    return out


class BranchingRollout:
    """One branching rollout of a batch of prompts (see the module docstring)."""

    def __init__(self, agent: AgentLoop, policy: BranchingPolicy) -> None:
        self.agent = agent
        self.policy = policy

    def run(
        self,
        model: torch.nn.Module,
        encodings: Sequence[dict[str, torch.Tensor]],
        contexts: Sequence[dict[str, Any]],
        *,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> tuple[list[BranchedTrajectory], Forest, dict[str, float]]:
        if len(encodings) != len(contexts):
            raise ValueError(f"{len(encodings)} prompt encodings but {len(contexts)} contexts")
        pol = self.policy
        self.model, self.device, self.dtype = model, device, dtype
        self.encodings, self.contexts = list(encodings), list(contexts)
        G = len(encodings)
        self.forest = Forest(budgets={g: pol.n for g in range(G)})
        self.roots = [self.forest.add_root(g) for g in range(G)]
        self.count = [0] * G  # rows held: started (live or ended) + pending
        self.pending = [0] * G
        self.live: list[_Row] = []
        self.done: list[_Row] = []
        self.round = 0
        self.stats: dict[str, float] = defaultdict(float)
        self._started = 0
        global_rows = []
        if pol.probe():
            self.pending = [1] * G
            self.count = [1] * G
            self._rounds(branching=False, refill=False, probe=True)
            for g in range(G):
                probe = next(r for r in self.done if r.traj.group == g and r.traj.probe)
                h_root = probe.entropies[0] if probe.entropies else 0.0
                after = probe.entropies[1:]
                h_tool = sum(after) / len(after) if after else h_root
                m = pol.global_rows(h_root, h_tool)
                self.forest.nodes[self.roots[g]].info.update(h_root=h_root, h_tool=h_tool, global_rows=m)
                if not getattr(pol, "keep_probe", True):
                    self.forest.prune(probe.node)
                    self.done.remove(probe)
                    self.count[g] -= 1
                new = max(0, min(m, pol.n) - self.count[g])
                self.pending[g] += new
                self.count[g] += new
                global_rows.append(m)
        else:
            for g in range(G):
                m = pol.initial_children(g)
                self.pending[g] = self.count[g] = m
                global_rows.append(m)
        self._rounds(branching=True, refill=True, probe=False)
        return self._finish(global_rows)

    # -- rounds ------------------------------------------------------------------------------------
    def _room(self) -> int:
        cap = self.policy.max_live_rows
        return 10**9 if cap == 0 else cap - len(self.live)

    def _start_pending(self, probe: bool) -> None:
        for g, k in enumerate(self.pending):
            take = min(k, self._room())
            if take <= 0:
                continue
            for _ in range(take):
                enc = self.encodings[g]
                traj = BranchedTrajectory(
                    encoding=dict(enc),
                    prompt_len=int(enc["input_ids"].shape[1]),
                    group=g,
                    born_round=self.round + 1,
                    probe=probe,
                )
                node = self.forest.add_child(self.roots[g], kind="turn")
                self.live.append(_Row(traj, node, share=("prompt", g, self.round), serial=self._started))
                self._started += 1
            self.pending[g] -= take

    def _rounds(self, *, branching: bool, refill: bool, probe: bool) -> None:
        s = self.agent.settings
        while True:
            self._start_pending(probe)
            if not self.live:
                if any(self.pending):
                    raise RuntimeError("branching rollout: rows pending but none can start")  # cap >= 1: unreachable
                if refill and self._refill():
                    continue
                return
            self.round += 1
            self.stats["peak_live_rows"] = max(self.stats["peak_live_rows"], len(self.live))
            ended, going, jobs, errors = self._generate()
            for r in self.live:
                if id(r) in going and r.traj.num_turns >= s.max_turns:
                    del going[id(r)]  # no observation after the last turn
                    ended[id(r)] = "turn_cap"
            if self.policy.needs_entropy:
                # the probe's every chunk (H_root, H_tool); else chunks that may lead to a branch
                budget = [c < self.policy.n for c in self.count]
                self._measure([r for r in self.live if probe or (id(r) in going and budget[r.traj.group])])
            results = self.agent.run_tools([j for j in jobs if j[0] in going])
            survivors: list[_Row] = []
            for r in self.live:
                if id(r) in ended:
                    self.forest.finish(r.node, ended[id(r)], truncated=ended[id(r)] == "truncated")
                    self.done.append(r)
                    continue
                res = self.agent.turn_result(r.traj, results.get(id(r), []), errors.get(id(r)))
                obs = self.agent.append_observation(r.traj, res)
                for tok in obs["input_ids"][0].tolist():
                    self.forest.append(r.node, int(tok), action=False)
                survivors.append(r)
            self.live = survivors
            if branching:
                self._branch()
            if refill:
                self._refill()

    def _generate(self) -> tuple[dict[int, str], dict[int, list[ToolCall]], list, dict[int, str]]:
        """One turn of every live row: one engine call per fork multiplicity, each distinct
        context once with ``num_samples`` = its rows."""
        s = self.agent.settings
        pol = self.agent.policy
        gen = GenerationSettings(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, greedy=s.greedy
        )
        families: dict[Any, list[_Row]] = {}
        for r in self.live:
            families.setdefault(r.share, []).append(r)
        by_size: dict[int, list[list[_Row]]] = defaultdict(list)
        for fam in families.values():
            by_size[len(fam)].append(fam)
        ended: dict[int, str] = {}
        going: dict[int, list[ToolCall]] = {}
        jobs: list[tuple[int, ToolCall, dict[str, Any]]] = []
        errors: dict[int, str] = {}
        for size, fams in sorted(by_size.items()):
            encs = [fam[0].traj.encoding for fam in fams]
            self.stats["prefill_tokens"] += sum(int(e["input_ids"].shape[1]) for e in encs)
            self.stats["replicated_prefill_tokens"] += size * sum(int(e["input_ids"].shape[1]) for e in encs)
            out = self.agent.engine.generate(
                self.model, pol.collate(encs), gen, device=self.device, dtype=self.dtype, num_samples=size
            )
            rows = [r for fam in fams for r in fam]  # prompt-major, as the engine returns them
            for j, r in enumerate(rows):
                m = out.mask[j].bool()
                ids = out.completion_ids[j][m]
                lps = out.logprobs[j][m] if out.logprobs is not None else torch.zeros(len(ids))
                text = pol.decode(out.completion_ids[j : j + 1], out.mask[j : j + 1])[0]
                self.stats["decoded_tokens"] += len(ids)
                for tok, lp in zip(ids.tolist(), lps.tolist()):
                    self.forest.append(r.node, int(tok), action=True, logprob=float(lp))
                r.last_len = len(ids)
                truncated = bool(out.truncated[j])
                goes_on, calls, error = self.agent.absorb_turn(r.traj, ids, lps, text, truncated)
                r.share = ("row", r.node)
                if not goes_on:
                    ended[id(r)] = "truncated" if truncated else ("answer" if r.traj.answer is not None else "stop")
                    continue
                if error is not None:
                    errors[id(r)] = error
                going[id(r)] = calls
                jobs += [(id(r), c, self.contexts[r.traj.group]) for c in calls]
        return ended, going, jobs, errors

    @torch.no_grad()
    def _measure(self, rows: list[_Row]) -> None:
        """Chunk entropy of the turn each of ``rows`` just generated (its first ``entropy_tokens``
        tokens, top-``top_k`` log-probs under the sampling temperature): one forward over the
        contexts. Sets ``h_init`` on a row's first chunk."""
        rows = [r for r in rows if r.last_len > 0]
        if not rows:
            return
        pol, bp = self.agent.policy, self.policy
        k = [min(bp.entropy_tokens, r.last_len) for r in rows]
        encs, comp = [], torch.full((len(rows), max(k)), pol.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), max(k), dtype=torch.bool)
        for i, r in enumerate(rows):
            L = int(r.traj.encoding["input_ids"].shape[1]) - r.last_len + k[i]
            encs.append(_cut(r.traj.encoding, L))
            comp[i, : k[i]] = r.traj.encoding["input_ids"][0, L - k[i] : L]
            mask[i, : k[i]] = True
        was_training = self.model.training
        self.model.eval()
        try:
            out = pol.score_conversations(
                encs,
                torch.tensor(k),
                comp,
                mask,
                model=self.model,
                temperature=self.agent.settings.temperature,
                with_entropy=False,
                topk=bp.top_k,
                device=self.device,
            )
        finally:
            self.model.train(was_training)
        V = _vocab_size(self.model)
        self.stats["entropy_rows"] += len(rows)
        for i, r in enumerate(rows):
            h = chunk_entropy(
                out.topk_logp[i, : k[i]].float().cpu(), out.logp[i, : k[i]].float().cpu(), V, reduce=bp.entropy_reduce
            )
            r.chunk_h = h
            r.entropies.append(h)
            if r.h_init is None:
                r.h_init = h
            info = self.forest.nodes[r.node].info
            info.setdefault("chunk_entropy", []).append(h)

    def _branch(self) -> None:
        """Ask the policy, row by row in order, how many rows to fork after the observation just
        appended; cap by the group's budget and the live-row cap."""
        new_rows: list[_Row] = []
        for r in self.live:
            g = r.traj.group
            left = self.policy.n - self.count[g]
            view = RowView(
                node=r.node,
                group=g,
                turns=r.traj.num_turns,
                tool_calls=r.traj.tool_calls,
                chunk_entropy=r.chunk_h,
                initial_entropy=r.h_init,
                consecutive_branches=r.consecutive,
                budget_left=left,
            )
            k = int(self.policy.on_observation(view)) if left > 0 else 0
            k = max(0, min(k, left, self._room() - len(new_rows)))
            self.stats["branch_decisions"] += 1
            if k == 0:
                r.consecutive = 0
                r.share = ("row", r.node)
                continue
            parent = r.node
            children = self.forest.fork(parent, k, kind="turn")
            r.consecutive += 1
            r.node, r.share = children[0], ("fork", parent)
            self.forest.nodes[children[0]].info["consecutive_branches"] = r.consecutive
            h_init = r.h_init if getattr(self.policy, "branch_initial_entropy", "own") == "inherit" else None
            for child in children[1:]:
                t = r.traj
                traj = BranchedTrajectory(
                    encoding=dict(t.encoding),
                    prompt_len=t.prompt_len,
                    action_mask=list(t.action_mask),
                    logprobs=list(t.logprobs),
                    turn_texts=list(t.turn_texts),
                    turn_calls=[list(c) for c in t.turn_calls],
                    observations=list(t.observations),
                    observation_images=[list(im) for im in t.observation_images],
                    num_turns=t.num_turns,
                    tool_calls=t.tool_calls,
                    tool_errors=t.tool_errors,
                    malformed_calls=t.malformed_calls,
                    group=g,
                    born_round=self.round + 1,
                    forked=True,
                )
                self.forest.nodes[child].info["consecutive_branches"] = r.consecutive
                new_rows.append(
                    _Row(
                        traj,
                        child,
                        share=("fork", parent),
                        h_init=h_init,
                        consecutive=r.consecutive,
                        serial=self._started + len(new_rows),
                    )
                )
            self.count[g] += k
            self.stats["branches"] += k
        self.live += new_rows
        self._started += len(new_rows)

    def _refill(self) -> bool:
        """Groups with no live row and fewer than n rows get new rows from the prompt."""
        busy = {r.traj.group for r in self.live}
        added = False
        for g in range(len(self.encodings)):
            if g in busy or self.pending[g] or self.count[g] >= self.policy.n:
                continue
            k = 1 if self.policy.refill == "one" else self.policy.n - self.count[g]
            self.pending[g] += k
            self.count[g] += k
            self.stats["refill_rows"] += k
            added = True
        return added

    def _finish(self, global_rows: list[int]) -> tuple[list[BranchedTrajectory], Forest, dict[str, float]]:
        done = sorted(self.done, key=lambda r: (r.traj.group, r.serial))
        trajs = []
        for r in done:
            r.traj.leaf_id = r.node
            trajs.append(r.traj)
        G = max(1, len(self.encodings))
        st = dict(self.stats)
        st["rounds"] = float(self.round)
        st["rows"] = float(len(trajs))
        st["rows_per_group"] = len(trajs) / G
        st["global_rows_mean"] = sum(global_rows) / G if global_rows else 0.0
        st["replicated_decoded_tokens"] = float(sum(sum(t.action_mask) for t in trajs))
        st.setdefault("branches", 0.0)
        return trajs, self.forest, st


def branching_agent_rollout(
    agent_loop: AgentLoop,
    model: torch.nn.Module,
    encodings: Sequence[dict[str, torch.Tensor]],
    contexts: Sequence[dict[str, Any]],
    policy: BranchingPolicy,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[list[BranchedTrajectory], Forest, dict[str, float]]:
    """Branching multi-turn rollouts (ARPO / agentic AEPO) of a batch of prompts.

    Args:
        agent_loop: the run's :class:`AgentLoop` (engine, tools, settings, turn and observation steps).
        model: the module to sample from.
        encodings: ONE prompt encoding per group (``input_ids [1, P]``, media); the group's rows
            all start from it.
        contexts: per group, what its tools may use.
        policy: an :class:`ARPOPolicy` / :class:`AEPOPolicy` (``BRANCHING_POLICIES``); its ``n``
            is the rows per group.
        device, dtype: as :meth:`AgentLoop.run`.

    Returns:
        ``(trajectories, forest, stats)``: exactly ``policy.n`` trajectories per group, group-major
        (group g's rows are ``trajectories[g * n : (g + 1) * n]``), each a forest leaf
        (``t.leaf_id``; see :func:`leaf_ids`), creation order within a group; feed them to
        :func:`mmpo.rollout.agent_loop.trajectory_tensors` as any agent trajectories. ``stats``
        (floats): ``branches``, ``refill_rows``, ``rounds``, ``rows_per_group``, ``global_rows_mean``
        (M, or AEPO's m), ``decoded_tokens`` (sampled once per shared prefix) vs.
        ``replicated_decoded_tokens`` (the action tokens of the rows), ``prefill_tokens`` vs.
        ``replicated_prefill_tokens`` (context tokens sent to the engine, shared vs. per row),
        ``entropy_rows`` (chunks scored for their entropy), ``branch_decisions``.
    """
    return BranchingRollout(agent_loop, policy).run(model, encodings, contexts, device=device, dtype=dtype)


__all__ = [
    "AEPOPolicy",
    "ARPOPolicy",
    "BRANCHING_POLICIES",
    "BranchedTrajectory",
    "BranchingPolicy",
    "BranchingRollout",
    "RowView",
    "aepo_branch_probability",
    "aepo_global_rows",
    "arpo_branch",
    "arpo_branch_probability",
    "branching_agent_rollout",
    "build_branching_policy",
    "chunk_entropy",
    "leaf_ids",
]
