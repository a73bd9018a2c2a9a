"""The tree rollout engine on a tiny text model: equality with plain sampling, exact sampling
log-probs through forks and rewinds, TreePO's shared decoding, LATR's forced tokens, budgets."""

from __future__ import annotations

import json

import pytest
import torch

from mmpo.models import load_model
from mmpo.policies.causal_lm import CausalLMPolicy
from mmpo.rollout.branching import BranchingPolicy, GroupView, LATRPolicy, Rewind, TreePOPolicy
from mmpo.rollout.engines.hf import GenerationSettings, HFGenerateEngine
from mmpo.rollout.engines.tree import TreeEngine, tree_generate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pol() -> CausalLMPolicy:
    model, proc, info = load_model("tiny:qwen2", seed=0)
    return CausalLMPolicy.from_info(model, proc, info)


def _encodings(pol: CausalLMPolicy, n: int) -> list[dict]:
    return [pol.encode([{"role": "user", "content": "tell " * (1 + 6 * i) + "me?"}]) for i in range(n)]


class _FavourEOS:
    """Raise the EOS logit so that rows end at varied lengths (removed on exit)."""

    def __init__(self, pol: CausalLMPolicy, bonus: float) -> None:
        self.pol, self.bonus = pol, bonus

    def __enter__(self) -> None:
        eos = self.pol.eos_token_ids[0]

        def hook(module, args, out):
            out = out.clone()
            out[..., eos] += self.bonus
            return out

        self.handle = self.pol.model.get_output_embeddings().register_forward_hook(hook)

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _pad(x: torch.Tensor, width: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def test_a_tree_that_never_branches_equals_plain_sampling(pol):
    encs = _encodings(pol, 2)
    settings = GenerationSettings(12, temperature=0.7)
    with _FavourEOS(pol, 3.0):
        torch.manual_seed(3)
        gen = HFGenerateEngine(pol).generate(pol.model, pol.collate(encs), settings, device=CPU, num_samples=4)
        torch.manual_seed(3)
        never = TreePOPolicy(4, w=4, segment_length=100, max_depth=100)  # no boundary within 12 tokens
        forest, rows, stats = TreeEngine(pol).generate(pol.model, pol.collate(encs), settings, never, device=CPU)
    lengths = gen.mask.sum(1)
    assert lengths.min() < lengths.max()  # early exit exercised
    W = max(gen.completion_ids.shape[1], rows.completion_ids.shape[1])
    assert torch.equal(_pad(rows.completion_ids, W, pol.pad_token_id), _pad(gen.completion_ids, W, pol.pad_token_id))
    assert torch.equal(_pad(rows.mask, W, False), _pad(gen.mask, W, False))
    assert torch.equal(_pad(rows.sample_logprobs, W, 0.0), _pad(gen.logprobs, W, 0.0))
    assert rows.row_group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert stats["decoded_tokens"] == stats["leaf_tokens"] == int(gen.mask.sum())


def test_sampling_logprobs_equal_the_policys_recomputation_through_forks_and_rewinds(pol):
    encs = _encodings(pol, 2)
    settings = GenerationSettings(10, temperature=0.8)
    torch.manual_seed(0)
    with _FavourEOS(pol, 4.0):
        treepo = TreePOPolicy(6, w=2, segment_length=3, max_depth=10, seed=1)
        forest, rows, stats = TreeEngine(pol).generate(pol.model, pol.collate(encs), settings, treepo, device=CPU)
        assert stats["waves"] > 1  # the fallback rewound finished leaves (re-prefilled contexts)
        assert any(n.kind == "fallback" for n in forest.nodes.values())
        assert rows.lengths.min() < rows.lengths.max()
        per_row = [encs[g] for g in rows.row_group.tolist()]
        with torch.no_grad():
            ref = pol.score(per_row, rows.completion_ids, rows.mask, temperature=0.8, share_prefix=False).logp
    sampled = rows.mask & ~rows.forced
    assert bool(sampled.any()) and not rows.forced.any()
    assert (ref - rows.sample_logprobs)[sampled].abs().max() < 1e-4
    assert torch.bincount(rows.row_group).tolist() == [6, 6]  # the budget n is met exactly


class _Rewinder(BranchingPolicy):
    """One first row; when it has ended, rewind its leaf to 5, 2 and 0 tokens (one row each)."""

    def initial_children(self, group: int) -> int:
        return 1

    def on_group_idle(self, view: GroupView) -> list[Rewind]:
        if len(view.leaves) != 1:
            return []
        return [Rewind(view.leaves[0], cut, 1) for cut in (5, 2, 0)]


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_rewinds_reprefill_truncated_contexts_exactly(kind):
    model, proc, info = load_model(f"tiny:{kind}", seed=0)
    pol = CausalLMPolicy.from_info(model, proc, info)
    if pol.is_vlm:
        from mmpo.tasks import build_task

        task = build_task("synthetic_vqa", {"num_train": 4}, seed=2)
        encs = [pol.encode(task.train_sample(i).messages) for i in range(2)]
    else:
        encs = _encodings(pol, 2)
    torch.manual_seed(0)
    settings = GenerationSettings(9, min_new_tokens=9, temperature=0.9)
    forest, rows, stats = TreeEngine(pol).generate(pol.model, pol.collate(encs), settings, _Rewinder(4), device=CPU)
    assert stats["waves"] == 2 and torch.bincount(rows.row_group).tolist() == [4, 4]
    ids = rows.completion_ids
    for g in range(2):
        r = [i for i in range(len(rows)) if rows.row_group[i] == g]
        first = ids[r[0]]
        assert torch.equal(ids[r[1], :5], first[:5]) and torch.equal(ids[r[2], :2], first[:2])
        assert forest.nodes[int(rows.row_leaf[r[3]])].parent_id == forest.roots[g]  # cut 0: a root child
    assert stats["decoded_tokens"] == 2 * (9 + 4 + 7 + 9)
    per_row = [encs[g] for g in rows.row_group.tolist()]
    with torch.no_grad():
        ref = pol.score(per_row, rows.completion_ids, rows.mask, temperature=0.9, share_prefix=False).logp
    assert rows.mask.all() and (ref - rows.sample_logprobs).abs().max() < 1e-4


def test_treepo_shares_segments_and_decodes_fewer_tokens_than_independent_rows(pol):
    encs = _encodings(pol, 2)
    settings = GenerationSettings(16, min_new_tokens=16)  # no EOS: every row runs 16 tokens
    torch.manual_seed(0)
    treepo = TreePOPolicy(8, w=2, segment_length=4, max_depth=100)
    forest, rows, stats = TreeEngine(pol).generate(pol.model, pol.collate(encs), settings, treepo, device=CPU)
    assert torch.bincount(rows.row_group).tolist() == [8, 8]
    # per group: 2, 4, 8, 8 segments of 4 tokens = 88 tokens instead of 8 x 16 = 128
    assert stats["decoded_tokens"] == 2 * 88 and stats["leaf_tokens"] == 2 * 128
    torch.manual_seed(0)
    gen = HFGenerateEngine(pol).generate(pol.model, pol.collate(encs), settings, device=CPU, num_samples=8)
    assert stats["decoded_tokens"] < int(gen.mask.sum()) == 256
    # every leaf's path: depth 1..4, the first 3 nodes shared by 4, 2, 1 leaves of its group
    for path in rows.leaf_paths:
        assert [forest.nodes[i].depth for i in path] == [1, 2, 3, 4]
        assert [len(forest.subtree_leaves(i)) for i in path] == [4, 2, 1, 1]
    assert (rows.token_node >= 0).all() and stats["peak_rows"] == 16


def test_latr_forced_tokens_are_marked_and_second_most_likely(pol):
    encs = _encodings(pol, 2)
    settings = GenerationSettings(14)
    torch.manual_seed(0)
    latr = LATRPolicy(6, tau_abs=0.0, tau_rel=1.0, tau_ed=None, lookahead=(2, 4), eta_schedule={0: 0.5})
    forest, rows, stats = TreeEngine(pol).generate(pol.model, pol.collate(encs), settings, latr, device=CPU)
    assert torch.bincount(rows.row_group).tolist() == [6, 6]  # 3 tree rows + 3 plain rows each
    assert stats["branches"] >= 2 and stats["exit_step"] >= 0
    alternatives = {c for n in forest.nodes.values() if n.kind == "token_branch" for c in n.children[1:]}
    first_forced = {c for c in alternatives if forest.nodes[c].forced[:1] == [True]}
    assert first_forced  # forks with a forced alternative happened
    per_row = [encs[g] for g in rows.row_group.tolist()]
    with torch.no_grad():
        ref = pol.score(per_row, rows.completion_ids, rows.mask, temperature=1.0, topk=2, share_prefix=False)
    checked = 0
    for r in range(len(rows)):
        nodes = rows.token_node[r].tolist()
        for t, nid in enumerate(nodes):
            if nid in first_forced and (t == 0 or nodes[t - 1] != nid):
                assert rows.forced[r, t] and rows.sample_logprobs[r, t] == 0
                assert abs(ref.logp[r, t] - ref.topk_logp[r, t, 1]) < 1e-5  # rank 2
                assert not ref.is_top1[r, t]
                checked += 1
            elif rows.forced[r, t]:  # greedy tree-phase tokens: rank 1
                assert ref.is_top1[r, t]
    assert checked >= len(first_forced)
    sampled = rows.mask & ~rows.forced
    assert bool(sampled.any())  # plain rows and the stochastic phase
    assert (ref.logp - rows.sample_logprobs)[sampled].abs().max() < 1e-4


def test_budgets_and_live_row_caps_are_never_exceeded(pol):
    encs = _encodings(pol, 3)
    settings = GenerationSettings(12)
    torch.manual_seed(1)
    with _FavourEOS(pol, 2.0):
        treepo = TreePOPolicy(8, w=4, segment_length=2, max_depth=100)
        forest, rows, stats = TreeEngine(pol, max_live_rows=10).generate(
            pol.model, pol.collate(encs), settings, treepo, device=CPU
        )
    assert stats["peak_rows"] <= 12  # cap 10 on forks; the first rows (3 x 4) come before it
    counts = torch.bincount(rows.row_group, minlength=3)
    assert (counts <= 8).all() and stats["refused_forks"] > 0
    for g in range(3):
        assert forest.rows_in_use(g) <= 8
    torch.manual_seed(1)
    latr = LATRPolicy(4, tau_abs=0.0, tau_rel=1.0, tau_ed=None, lookahead=(2,))
    forest, rows, stats = TreeEngine(pol).generate(pol.model, pol.collate(encs), settings, latr, device=CPU)
    assert torch.bincount(rows.row_group).tolist() == [4, 4, 4]
    assert stats["suppressed"] > 0  # capacity n_tree = 4 refused candidates
    torch.manual_seed(1)
    latr = LATRPolicy(4, tau_abs=0.0, tau_rel=1.0, tau_ed=None, lookahead=(2,))
    forest, rows, stats = TreeEngine(pol, max_live_rows=4).generate(
        pol.model, pol.collate(encs), settings, latr, device=CPU
    )
    assert stats["refused_forks"] > 0  # the live-row cap refused branches ...
    assert torch.bincount(rows.row_group).tolist() == [4, 4, 4]  # ... and the exit fill restored n rows


def test_latr_pruning_removes_similar_branches(pol):
    encs = _encodings(pol, 1)
    torch.manual_seed(0)
    # ED / l <= 1 < 1.5: every branch that reaches the age-3 checkpoint is similar, so pruned
    latr = LATRPolicy(4, tau_abs=0.0, tau_rel=1.0, tau_ed=1.5, lookahead=(3,), keep_math_symbols=False)
    forest, rows, stats = TreeEngine(pol).generate(
        pol.model, pol.collate(encs), GenerationSettings(12), latr, device=CPU
    )
    pruned = [n for n in forest.nodes.values() if n.status == "pruned"]
    assert stats["pruned"] > 0 and pruned
    assert all(n.status != "pruned" for leaf in rows.row_leaf.tolist() for n in [forest.nodes[leaf]])
    assert len(rows) == 4


def test_tree_generate_from_a_config_block(pol):
    torch.manual_seed(0)
    forest, rows, stats = tree_generate(
        pol,
        pol.model,
        pol.collate(_encodings(pol, 1)),
        {"method": "treepo", "w": 2, "segment_length": 3},
        GenerationSettings(8, min_new_tokens=8),
        CPU,
        group_size=4,
    )
    assert len(rows) == 4 and stats["decoded_tokens"] == 2 * 3 + 4 * 3 + 4 * 2


def test_bench_tree_prints_one_json_line(tmp_path, capsys):
    from mmpo.cli import main

    cfg = tmp_path / "tree.yaml"
    cfg.write_text(
        "task: {name: synthetic_vqa, num_train: 8, image_size: 56}\n"
        f"output_dir: {tmp_path / 'run'}\n"
        "model: {path: 'tiny:qwen2_vl'}\n"
        "rollout:\n  group_size: 4\n  prompts_per_step: 2\n  max_new_tokens: 6\n  min_new_tokens: 6\n"
        "  tree: {method: treepo, n: 4, w: 2, segment_length: 2}\n"
    )
    assert main(["bench", "--tree", str(cfg)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    out = json.loads(line)
    assert {"tree_tokens", "independent_tokens", "token_ratio", "tree_s", "independent_s"} <= set(out)
    # per prompt: 2 + 4 + 4 segments of 2 tokens = 20 tokens vs 4 rows x 6 = 24
    assert out["tree_tokens"] == 40 and out["independent_tokens"] == 48
    assert out["token_ratio"] == pytest.approx(40 / 48, abs=1e-4)


def test_bad_tree_block_is_refused_at_config_load(tmp_path):
    from mmpo.config import load_config
    from mmpo.errors import ConfigError

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("task: {name: synthetic_vqa}\nrollout:\n  tree: {method: treepo, w: 0}\n")
    with pytest.raises(ConfigError, match=r"rollout\.tree\.w"):
        load_config(cfg)
