"""Branching agent rollouts (ARPO arXiv 2507.19849, agentic AEPO arXiv 2510.14545) on the tiny
Qwen2: forks only right after tool results, at most n leaves per group, shared prefixes decoded
and prefilled once, leaves consistent with the forest's replicated rows, the branch rule, the
AEPO allocation / penalty cases and the chunk-entropy measurement."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from mmpo.errors import ConfigError
from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.agent_branching import (
    BRANCHING_POLICIES,
    AEPOPolicy,
    ARPOPolicy,
    BranchingPolicy,
    RowView,
    aepo_branch_probability,
    aepo_global_rows,
    arpo_branch,
    arpo_branch_probability,
    branching_agent_rollout,
    build_branching_policy,
    chunk_entropy,
    leaf_ids,
)
from mmpo.rollout.agent_loop import AgentLoop, AgentSettings, score_trajectories, trajectory_tensors
from mmpo.rollout.engines.base import Generation, RolloutEngine
from mmpo.rollout.engines.hf import HFGenerateEngine
from mmpo.rollout.tools import Tool, ToolResult

CPU = torch.device("cpu")
CALL = '<tool_call>{"name": "lookup", "arguments": {"key": "k%d"}}</tool_call>'
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa"]


class Lookup(Tool):
    """Deterministic toy tool: the key's length and the row's room."""

    name = "lookup"
    description = "Look a key up."
    parameters = {
        "type": "object",
        "properties": {"key": {"type": "string", "maxLength": 8}},
        "required": ["key"],
        "additionalProperties": False,
    }

    def run(self, arguments, context):
        return ToolResult(f"{arguments['key']} has {len(arguments['key'])} letters in {context['room']}")


class ToolScript(RolloutEngine):
    """Writes ``"<word> " + CALL`` while the context holds fewer than ``calls`` tool responses,
    then ``"<answer><word></answer>"`` (the word drawn per sample, so siblings differ), and
    reports the real model's log-probs of those tokens. Records every call (the contexts it was
    given, ``num_samples``, the tokens it wrote)."""

    def __init__(self, policy, calls: int):
        super().__init__(policy)
        self.calls = calls
        self.log: list[tuple[list[tuple[int, ...]], int, int]] = []

    def generate(self, model, prompt_inputs, settings, *, device, dtype=None, num_samples=1):
        pol = self.policy
        eos = pol.eos_token_ids[0]
        ids_in, am = prompt_inputs["input_ids"], prompt_inputs["attention_mask"].bool()
        contexts = [tuple(r[m].tolist()) for r, m in zip(ids_in, am)]
        rows = []
        for ctx in contexts:
            seen = pol.tokenizer.decode(list(ctx)).count("<tool_response>")
            for _ in range(num_samples):
                word = WORDS[int(torch.randint(len(WORDS), (1,)))]
                text = f"{word} " + CALL % seen if seen < self.calls else f"<answer>{word}</answer>"
                rows.append(pol.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pol.pad_token_id)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for k, r in enumerate(rows):
            ids[k, : len(r)] = torch.tensor(r)
            mask[k, : len(r)] = True
        rep = {k: v.repeat_interleave(num_samples, dim=0) for k, v in prompt_inputs.items()}
        with torch.no_grad():
            lp = pol.log_probs(rep, ids, mask, model=model, with_entropy=False).logp.masked_fill(~mask, 0.0)
        self.log.append((contexts, num_samples, int(mask.sum())))
        return Generation(ids, mask, torch.zeros(len(rows), dtype=torch.bool), lp)


@pytest.fixture(scope="module")
def pol():
    model, tok, info = load_model("tiny:qwen2")
    return CausalLMPolicy.from_info(model, tok, info)


def _prompts(pol, k):
    return [pol.encode([{"role": "user", "content": f"question {i}?"}]) for i in range(k)], [
        {"room": f"room{i}"} for i in range(k)
    ]


def _run(pol, policy, calls, groups=1, max_turns=4, engine=None):
    engine = engine or ToolScript(pol, calls)
    loop = AgentLoop(pol, engine, [Lookup()], AgentSettings(max_turns=max_turns, max_new_tokens=24))
    encs, ctxs = _prompts(pol, groups)
    trajs, forest, stats = branching_agent_rollout(loop, pol.model, encs, ctxs, policy, CPU)
    return trajs, forest, stats, engine, loop


def _obs_ids(loop, text):
    return loop.encode_observation(ToolResult(text))["input_ids"][0].tolist()


# ----------------------------------------------------------------------------- pure functions


def test_arpo_branch_rule_hand_cases():
    # T3-a: beta = 0.5, w = 0.2, p = clip(u - w dH, 0, 1), branch iff p <= beta
    assert arpo_branch(0.6, 0.5) is True  # p = 0.50
    assert arpo_branch(0.6, 0.4) is False  # p = 0.52
    assert arpo_branch(0.3, -1.0) is True  # p = 0.50
    assert arpo_branch(0.9, 3.0) is True  # p = 0.30
    assert arpo_branch_probability(0.5) == pytest.approx(0.6)
    assert arpo_branch_probability(3.0) == 1.0 and arpo_branch_probability(-5.0) == 0.0
    # marginally P(branch) = clip(beta + w dH, 0, 1): over a uniform grid of u
    us = [(i + 0.5) / 2000 for i in range(2000)]
    for dh in (-3.0, -1.0, 0.0, 0.7, 4.0):
        frac = sum(arpo_branch(u, dh) for u in us) / len(us)
        assert frac == pytest.approx(arpo_branch_probability(dh), abs=1e-3)


def test_aepo_allocation_and_penalty_hand_cases():
    # T4-a: k = 16, beta_m = 1
    assert aepo_global_rows(1.0, 1.0, 16) == 8
    assert 16 / (1 + math.exp(-1)) == pytest.approx(11.70, abs=5e-3)
    assert aepo_global_rows(2.0, 1.0, 16) == 12
    assert aepo_global_rows(0.5, 1.5, 16) == 4
    assert aepo_global_rows(-500.0, 500.0, 16) == 1  # m >= 1 always
    assert aepo_global_rows(500.0, -500.0, 16) == 16  # m = k: no branching
    assert aepo_global_rows(1.0, 0.0, 16, beta_m=0.0) == 8
    # T4-c: alpha = 0.5, gamma = 0.2, dH = 0.5 -> P = 0.6
    for l, p in ((0, 0.6), (1, 0.3), (2, 0.15)):
        assert aepo_branch_probability(0.5, l) == pytest.approx(p)
    assert aepo_branch_probability(0.5, 3, rho=1.0) == pytest.approx(0.6)  # rho = 1: ARPO
    assert aepo_branch_probability(10.0, 0) == 1.0 and aepo_branch_probability(-10.0, 0) == 0.0


def test_aepo_decisions_follow_the_penalty_and_reduce_to_arpo():
    """Same draws: AEPO with rho = 1 makes ARPO's decisions; with rho = 0.5 a row that branched
    at the step before branches with half the probability."""
    view = RowView(
        node=0,
        group=0,
        turns=2,
        tool_calls=2,
        chunk_entropy=1.5,
        initial_entropy=1.0,
        consecutive_branches=0,
        budget_left=10**6,
    )
    arpo = ARPOPolicy(10**6, 1, beam=2, seed=3)
    aepo = AEPOPolicy(10**6, 1, probe=False, beam=2, rho=1.0, seed=3)
    a = [arpo.on_observation(view) for _ in range(400)]
    b = [aepo.on_observation(view) for _ in range(400)]
    assert a == b and 0.5 < sum(a) / 400 < 0.7  # P = 0.6
    view.consecutive_branches = 1
    pen = AEPOPolicy(10**6, 1, probe=False, beam=2, rho=0.5, seed=4)
    rate = sum(pen.on_observation(view) for _ in range(4000)) / 4000
    assert rate == pytest.approx(0.3, abs=0.03)
    # beam b: at most b - 1 extra rows per decision, never more than the budget
    many = ARPOPolicy(100, 1, beam=4, beta=1.0, seed=0)
    view.budget_left = 2
    assert many.on_observation(view) == 2
    view.budget_left = 50
    assert many.on_observation(view) == 3


def test_chunk_entropy_hand_case():
    V = 4
    # position 0: top-2 probs 0.5, 0.3, sampled inside; position 1: 0.4, 0.4, sampled p = 0.1 outside
    topk = torch.tensor([[0.5, 0.3], [0.4, 0.4]]).log()
    sampled = torch.tensor([0.3, 0.1]).log()
    h0 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3))
    h1 = -(2 * 0.4 * math.log(0.4) + 0.1 * math.log(0.1))
    assert chunk_entropy(topk, sampled, V) == pytest.approx((h0 + h1) / math.log(V))
    assert chunk_entropy(topk, sampled, V, reduce="mean") == pytest.approx((h0 + h1) / 2 / math.log(V))
    assert chunk_entropy(topk[:1], sampled[:1], V) == pytest.approx(h0 / math.log(V))  # one token
    assert chunk_entropy(topk[:0], sampled[:0], V) == 0.0
    # a certain token: zero entropy (the 0 * log 0 candidates count 0)
    assert chunk_entropy(torch.tensor([[0.0, -float("inf")]]), torch.tensor([0.0]), V) == 0.0
    with pytest.raises(ConfigError, match="entropy_reduce"):
        chunk_entropy(topk, sampled, V, reduce="max")


def test_bad_options_raise_config_errors():
    cases = [
        (lambda: ARPOPolicy(0), "n: 0"),
        (lambda: ARPOPolicy(4, 5), "initial: 5"),
        (lambda: ARPOPolicy(4, 0), "initial: 0"),
        (lambda: ARPOPolicy(4, beam=0), "beam: 0"),
        (lambda: ARPOPolicy(4, beta=1.5), "beta: 1.5"),
        (lambda: ARPOPolicy(4, w=float("nan")), "w: nan"),
        (lambda: ARPOPolicy(4, refill="some"), "refill: 'some'"),
        (lambda: ARPOPolicy(4, max_live_rows=-1), "max_live_rows: -1"),
        (lambda: ARPOPolicy(4, entropy_tokens=0), "entropy_tokens: 0"),
        (lambda: ARPOPolicy(4, entropy_reduce="max"), "entropy_reduce: 'max'"),
        (lambda: ARPOPolicy(4, branch_initial_entropy="parent"), "branch_initial_entropy: 'parent'"),
        (lambda: AEPOPolicy(4, rho=2.0), "rho: 2.0"),
        (lambda: AEPOPolicy(4, beta=0.5), "beta: 0.5"),
        (lambda: build_branching_policy("arpo", 4, {"gamma": 0.1}), "arpo.gamma: unknown option"),
        (lambda: build_branching_policy("aepo", 4), "Unknown branching policy 'aepo'"),
    ]
    for make, msg in cases:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(".", r"\.")):
            make()
    assert BRANCHING_POLICIES.names() == ["aepo_agent", "arpo"]
    p = build_branching_policy("aepo_agent", 6, {"rho": 0.25, "initial": 2, "beam": 3})
    assert isinstance(p, AEPOPolicy) and (p.n, p.rho, p.initial, p.beam) == (6, 0.25, 2, 3)


# ----------------------------------------------------------------------------- the loop


def test_forks_only_after_tool_results_and_shared_prefixes_once(pol):
    torch.manual_seed(0)
    # beta = 1: every tool result branches while the group has budget (2 calls, then an answer)
    trajs, forest, stats, engine, loop = _run(pol, ARPOPolicy(4, 1, beta=1.0, seed=0), calls=2)
    assert len(trajs) == 4 and [t.group for t in trajs] == [0] * 4
    assert all(t.answer in WORDS and t.num_turns == 3 for t in trajs)
    assert [t.forked for t in trajs] == [False, True, True, True]
    forks = [n for n in forest.nodes.values() if n.children and n.parent_id is not None]
    assert len(forks) == 3 and stats["branches"] == 3
    for n in forks:
        # the forked node ends with the tool result: its encoded observation, masked out
        assert len(n.children) == 2
        obs = _obs_ids(loop, f"k{n.depth - 1} has 2 letters in room0")
        assert n.token_ids[-len(obs) :] == obs and not any(n.action_mask[-len(obs) :])
        assert n.action_mask[0]  # and starts with the model's turn
    # decoded once: 1 + 2 + 4 chunks instead of 4 x 3
    chunks = sum(c * len(ctx) for ctx, c, _ in engine.log)
    assert chunks == 7
    node_actions = sum(sum(n.action_mask) for n in forest.nodes.values())
    assert sum(tok for *_, tok in engine.log) == node_actions == stats["decoded_tokens"]
    replicated = sum(sum(t.action_mask) for t in trajs)
    assert stats["replicated_decoded_tokens"] == replicated > node_actions
    # prefilled once: no context (observation included) is sent to the engine twice
    contexts = [ctx for cs, _, _ in engine.log for ctx in cs]
    assert len(contexts) == len(set(contexts)) == 4  # prompt, after obs 1, two after obs 2
    assert [c for _, c, _ in engine.log] == [1, 2, 2]
    assert stats["prefill_tokens"] == sum(len(c) for c in contexts) < stats["replicated_prefill_tokens"]
    # every row's conversation ends in its path: the prompt + the forest's tokens
    for t in trajs:
        assert t.encoding["input_ids"][0, t.prompt_len :].tolist() == forest.context_tokens(t.leaf_id)


def test_leaves_are_rows_consistent_with_the_forest(pol):
    torch.manual_seed(1)
    trajs, forest, stats, engine, loop = _run(pol, ARPOPolicy(3, 2, beta=1.0, seed=1), calls=2, groups=2)
    assert [t.group for t in trajs] == [0, 0, 0, 1, 1, 1]
    assert sorted(leaf_ids(trajs)) == sorted(forest.leaves())
    tt = trajectory_tensors(trajs, pol.pad_token_id)
    rows = forest.materialise(pol.pad_token_id, leaf_ids(trajs))
    assert torch.equal(tt["completion_ids"], rows.completion_ids)
    assert torch.equal(tt["mask"], rows.mask)
    assert torch.equal(tt["logprobs"], rows.sample_logprobs)
    assert torch.equal(tt["lengths"], rows.lengths)
    assert rows.row_group.tolist() == [0, 0, 0, 1, 1, 1] and rows.row_leaf.tolist() == leaf_ids(trajs)
    assert not rows.forced.any()
    # observations masked: the masked-out tokens of a row are exactly its observations
    for i, t in enumerate(trajs):
        off = tt["completion_ids"][i][: t.length][~tt["mask"][i][: t.length]].tolist()
        expect = [tok for o in t.observations for tok in _obs_ids(loop, o)]
        assert off == expect and len(t.observations) == 2
    # a node's tokens are the same in every row through it
    for nid in {int(x) for x in rows.token_node.unique() if x >= 0}:
        cells = rows.token_node == nid
        per_row = [rows.completion_ids[r][cells[r]].tolist() for r in range(len(trajs)) if cells[r].any()]
        assert len(per_row) == len(forest.subtree_leaves(nid)) and all(p == per_row[0] for p in per_row)
    # the stored sampling log-probs equal one forward over the whole conversations
    logp, mask = score_trajectories(pol, trajs)
    assert torch.allclose(logp[mask], tt["logprobs"][mask], atol=2e-4)


class FixedForks(BranchingPolicy):
    """Forks ``k`` rows after each of the first ``rows`` tool results of round 1, never after."""

    def __init__(self, n, initial, rows, k=1, **kw):
        super().__init__(n, **kw)
        self.initial, self.rows, self.k, self.asked = initial, rows, k, []

    def initial_children(self, group):
        return self.initial

    def on_observation(self, row):
        self.asked.append((row.turns, row.budget_left))
        first_round = row.turns == 1 and sum(1 for t, _ in self.asked if t == 1) <= self.rows
        return self.k if first_round else 0


def test_budget_and_refill_cases(pol):
    # T3-c: n = 16, M = 8; all 8 branch after round 1 -> 16 rows, no further branching
    torch.manual_seed(2)
    policy = FixedForks(16, 8, rows=8)
    trajs, forest, stats, *_ = _run(pol, policy, calls=2)
    assert len(trajs) == 16 == len(forest.leaves(0)) and stats["branches"] == 8
    assert [turns for turns, _ in policy.asked] == [1] * 8  # never asked once the budget is spent
    # only 3 branch (count 11); every row answers at turn 2 -> one fresh row per round up to 16
    torch.manual_seed(3)
    trajs, forest, stats, *_ = _run(pol, FixedForks(16, 8, rows=3), calls=1)
    assert len(trajs) == 16 and stats["branches"] == 3 and stats["refill_rows"] == 5
    refilled = [t.born_round for t in trajs if not t.forked and t.born_round > 1]
    assert refilled == [3, 5, 7, 9, 11]
    assert sum(t.forked for t in trajs) == 3
    # refill "all": the five missing rows start together
    torch.manual_seed(3)
    trajs, *_ = _run(pol, FixedForks(16, 8, rows=3, refill="all"), calls=1)
    assert [t.born_round for t in trajs if not t.forked and t.born_round > 1] == [3] * 5
    # the budget caps forks: n = 3, always branching, two tool results
    torch.manual_seed(4)
    trajs, forest, stats, *_ = _run(pol, ARPOPolicy(3, 1, beta=1.0, seed=0), calls=2, groups=2)
    assert Counter(t.group for t in trajs) == {0: 3, 1: 3} and stats["branches"] == 4
    for g in (0, 1):
        assert len(forest.leaves(g)) == 3


def test_live_row_cap(pol):
    torch.manual_seed(5)
    policy = ARPOPolicy(6, 1, beam=3, beta=1.0, max_live_rows=2, seed=0)
    trajs, forest, stats, engine, _ = _run(pol, policy, calls=3, max_turns=4)
    assert len(trajs) == 6 and len(forest.leaves(0)) == 6
    # rounds are consecutive runs of engine calls; never more than 2 rows in one round
    per_call = [c * len(ctx) for ctx, c, _ in engine.log]
    assert max(per_call) <= 2 and stats["peak_live_rows"] <= 2
    assert stats["branches"] >= 1


def test_aepo_consecutive_branch_penalty_in_the_loop(pol):
    # alpha = 1, gamma = 0: P = rho ** l. rho = 0: branch, not again at the next step, then again
    torch.manual_seed(6)
    trajs, forest, stats, *_ = _run(
        pol, AEPOPolicy(4, 1, probe=False, alpha=1.0, gamma=0.0, rho=0.0, seed=0), calls=3, max_turns=4
    )
    assert len(trajs) == 4 and stats["branches"] == 3
    assert [t.born_round for t in trajs] == [1, 2, 4, 4]
    for t in trajs:
        path = forest.path(t.leaf_id)
        assert len(path) == 3  # forks after tool results 1 and 3 only
        assert [forest.nodes[n].info.get("consecutive_branches") for n in path[1:]] == [1, 1]
    # rho = 1 (ARPO): branching at tool results 1 and 2 exhausts the budget
    torch.manual_seed(6)
    trajs, forest, stats, *_ = _run(
        pol, AEPOPolicy(4, 1, probe=False, alpha=1.0, gamma=0.0, rho=1.0, seed=0), calls=3, max_turns=4
    )
    assert [t.born_round for t in trajs] == [1, 2, 3, 3] and stats["branches"] == 3


def _direct_chunk_entropies(pol, traj, k_h=20, top_k=10):
    """Each turn's chunk entropy from one plain forward over the whole conversation."""
    ids = traj.encoding["input_ids"]
    with torch.no_grad():
        logits = pol.model(input_ids=ids).logits[0].float()
    never = torch.tensor(pol.never_sample_ids, dtype=torch.long)
    if never.numel():
        logits = logits.index_fill(-1, never, float("-inf"))
    logp = torch.log_softmax(logits, -1)
    mask, out, pos = traj.action_mask, [], 0
    while pos < len(mask):
        if not mask[pos]:
            pos += 1
            continue
        end = pos
        while end < len(mask) and mask[end]:
            end += 1
        cols = torch.arange(pos, min(end, pos + k_h)) + traj.prompt_len - 1  # position p predicts p + 1
        targets = ids[0, cols + 1]
        top = logp[cols].topk(top_k, -1).values
        out.append(chunk_entropy(top, logp[cols, targets], logits.shape[-1]))
        pos = end
    return out


def test_aepo_probe_sets_the_global_rows(pol):
    torch.manual_seed(7)
    # alpha = gamma = 0: no branches, so the group is the probe, m - 1 global rows and refills
    policy = AEPOPolicy(8, probe=True, alpha=0.0, gamma=0.0, seed=0)
    trajs, forest, stats, *_ = _run(pol, policy, calls=2)
    assert len(trajs) == 8 and stats["branches"] == 0
    probe = [t for t in trajs if t.probe]
    assert len(probe) == 1 and probe[0] is trajs[0]
    info = forest.nodes[forest.roots[0]].info
    h = _direct_chunk_entropies(pol, probe[0])
    assert len(h) == 3 and info["h_root"] == pytest.approx(h[0], rel=1e-4)
    assert info["h_tool"] == pytest.approx((h[1] + h[2]) / 2, rel=1e-4)
    m = aepo_global_rows(h[0], (h[1] + h[2]) / 2, 8)
    assert info["global_rows"] == m and stats["global_rows_mean"] == m
    # the probe takes rounds 1-3; the other m - 1 global rows start together after it
    assert sum(t.born_round == 4 for t in trajs) == m - 1
    # keep_probe = False: the probe is dropped and m global rows start after it
    torch.manual_seed(7)
    policy = AEPOPolicy(8, probe=True, keep_probe=False, alpha=0.0, gamma=0.0, seed=0)
    trajs, forest, stats, *_ = _run(pol, policy, calls=2)
    assert len(trajs) == 8 and not any(t.probe for t in trajs) and len(forest.leaves(0)) == 8
    assert sum(t.born_round == 4 for t in trajs) == forest.nodes[forest.roots[0]].info["global_rows"] == m
    assert [n.status for n in forest.nodes.values() if n.parent_id == forest.roots[0]][0] == "pruned"


def test_arpo_measures_the_chunk_entropy_that_decides(pol):
    """The entropy stored per chunk (its first 20 tokens' top-10 log-probs) is the one a direct
    forward gives; H_init is the row's first chunk."""
    torch.manual_seed(8)
    trajs, forest, stats, *_ = _run(pol, ARPOPolicy(2, 1, beta=0.0, w=0.0, seed=0), calls=2)
    t = trajs[0]
    h = _direct_chunk_entropies(pol, t)
    stored = [x for n in forest.path(t.leaf_id) for x in forest.nodes[n].info.get("chunk_entropy", [])]
    assert len(stored) >= 2 and stored == pytest.approx(h[: len(stored)], rel=1e-4)


def test_real_sampling_engine_branches_only_after_tool_results(pol):
    """With the real sampler the tiny model rarely writes a call: whatever it does, every fork
    follows an observation and each group ends with exactly n rows."""
    torch.manual_seed(9)
    engine = HFGenerateEngine(pol)
    trajs, forest, stats, _, loop = _run(pol, ARPOPolicy(3, 1, beta=1.0, seed=0), calls=0, groups=2, engine=engine)
    assert Counter(t.group for t in trajs) == {0: 3, 1: 3}
    for n in forest.nodes.values():
        if n.children and n.parent_id is not None:
            assert not n.action_mask[-1]  # a fork closes a node that ends with an observation
    assert stats["branches"] == sum(t.forked for t in trajs)
    tt = trajectory_tensors(trajs, pol.pad_token_id)
    rows = forest.materialise(pol.pad_token_id, leaf_ids(trajs))
    assert torch.equal(tt["completion_ids"], rows.completion_ids) and torch.equal(tt["mask"], rows.mask)
