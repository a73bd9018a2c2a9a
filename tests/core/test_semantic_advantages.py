"""seed_grpo, semantic_entropy and copo against the spec's hand values and independent loops."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from mmpo.core import ADVANTAGES
from mmpo.core.semantic_advantages import copo, seed_grpo, semantic_entropy
from mmpo.errors import ConfigError


def _t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def _ids(xs):
    return torch.tensor(xs, dtype=torch.long)


def _seed(rewards, clusters, ids=None, **opts):
    ids = [0] * len(rewards) if ids is None else ids
    opts.setdefault("probability", "count")
    return seed_grpo(_t(rewards), _ids(ids), cluster_ids=_ids(clusters), **opts)


# --------------------------------------------------------------------------- semantic_entropy
def test_semantic_entropy_count_mode_hand_values():
    # answers ["2","2","2","3"]: p = [0.75, 0.25]
    se = semantic_entropy(_ids([0, 0, 0, 1]), _ids([0] * 4))
    torch.testing.assert_close(se, _t([0.83699] * 4), atol=1e-5, rtol=0)
    rao = semantic_entropy(_ids([0, 0, 0, 1]), _ids([0] * 4), se_estimator="rao")
    torch.testing.assert_close(rao, _t([0.56234] * 4), atol=1e-5, rtol=0)


def test_semantic_entropy_no_answer_rows_are_singletons():
    # answers ["2", None, None, "2"]: clusters {0,3}, {1}, {2}
    se = semantic_entropy(_ids([7, -1, -1, 7]), _ids([0] * 4))
    torch.testing.assert_close(se, _t([1.15524] * 4), atol=1e-5, rtol=0)
    # no answer at all: G singletons, SE = log G under both estimators
    for est in ("cluster_mean", "rao"):
        se = semantic_entropy(_ids([-1] * 4), _ids([0] * 4), se_estimator=est)
        torch.testing.assert_close(se, _t([math.log(4)] * 4))


def test_semantic_entropy_likelihood_mode_matches_formula():
    clusters, seq_logp, lengths = [0, 0, 1, 1], [-2.0, -4.0, -6.0, -6.0], [2.0, 2.0, 3.0, 3.0]
    # length-normalised: l = [-1, -2, -2, -2]
    z = math.exp(-1) + 3 * math.exp(-2)
    p0, p1 = (math.exp(-1) + math.exp(-2)) / z, 2 * math.exp(-2) / z
    se = semantic_entropy(
        _ids(clusters), _ids([3] * 4), seq_logp=_t(seq_logp), lengths=_t(lengths), probability="likelihood"
    )
    torch.testing.assert_close(se, _t([-(math.log(p0) + math.log(p1)) / 2] * 4))
    rao = semantic_entropy(
        _ids(clusters),
        _ids([3] * 4),
        seq_logp=_t(seq_logp),
        lengths=_t(lengths),
        probability="likelihood",
        se_estimator="rao",
    )
    torch.testing.assert_close(rao, _t([-(p0 * math.log(p0) + p1 * math.log(p1))] * 4))
    # raw sums: l = [-2, -4, -6, -6]
    z = math.exp(-2) + math.exp(-4) + 2 * math.exp(-6)
    q0, q1 = (math.exp(-2) + math.exp(-4)) / z, 2 * math.exp(-6) / z
    raw = semantic_entropy(
        _ids(clusters), _ids([3] * 4), seq_logp=_t(seq_logp), probability="likelihood", length_normalize=False
    )
    torch.testing.assert_close(raw, _t([-(math.log(q0) + math.log(q1)) / 2] * 4))


def test_semantic_entropy_cluster_ids_are_per_group():
    # cluster 0 of group 5 and cluster 0 of group 9 are different clusters
    se = semantic_entropy(_ids([0, 1, 0, 0]), _ids([5, 5, 9, 9]))
    torch.testing.assert_close(se, _t([math.log(2), math.log(2), 0.0, 0.0]))


# --------------------------------------------------------------------------- seed_grpo
def test_seed_grpo_spec_case_1_count_mode():
    adv = _seed([1, 1, 1, 0], [0, 0, 0, 1])
    torch.testing.assert_close(adv, _t([0.17453, 0.17453, 0.17453, -0.52359]), atol=1e-5, rtol=0)
    rao = _seed([1, 1, 1, 0], [0, 0, 0, 1], se_estimator="rao")
    torch.testing.assert_close(rao, _t([0.25, 0.25, 0.25, -0.75]) * 0.79718, atol=1e-5, rtol=0)
    assert ADVANTAGES.get("seed_grpo") is seed_grpo


def test_seed_grpo_spec_case_2_all_equal_and_all_distinct():
    same = _seed([1, 0, 1, 0], [4, 4, 4, 4])
    torch.testing.assert_close(same, _t([0.5, -0.5, 0.5, -0.5]), rtol=0, atol=0)
    for est in ("cluster_mean", "rao"):
        distinct = _seed([1, 0, 1, 0], [0, 1, 2, 3], se_estimator=est)
        torch.testing.assert_close(distinct, _t([0.25, -0.25, 0.25, -0.25]))
        alpha = _seed([1, 0, 1, 0], [0, 1, 2, 3], se_estimator=est, alpha=0.2)
        torch.testing.assert_close(alpha, _t([0.5, -0.5, 0.5, -0.5]) * 0.8)


def test_seed_grpo_spec_case_3_unparseable_answers():
    adv = _seed([1, 0, 0, 1], [3, -1, -1, 3])
    torch.testing.assert_close(adv, _t([0.5, -0.5, -0.5, 0.5]) * 0.58333, atol=1e-5, rtol=0)


def test_seed_grpo_f_families():
    x = 0.5 * 0.836988 / math.log(4)
    base = [0.25, 0.25, 0.25, -0.75]
    for f, scale in (("exp", math.exp(-x)), ("focal", (1 - x) ** 3), ("inverse", 1 / (1 + x))):
        adv = _seed([1, 1, 1, 0], [0, 0, 0, 1], f=f, gamma=3.0)
        torch.testing.assert_close(adv, _t([b * scale for b in base]), atol=1e-6, rtol=0)


def test_seed_grpo_grpo_base_uses_unbiased_z_score():
    adv = _seed([1, 1, 1, 0], [0, 0, 0, 1], base="grpo")
    # mean 0.75, unbiased std 0.5
    torch.testing.assert_close(adv, _t([0.25, 0.25, 0.25, -0.75]) / 0.500001 * 0.69812, atol=1e-5, rtol=0)


def test_seed_grpo_singleton_group_is_not_scaled():
    # G = 1: SE_max = 0, x = 0; Dr.GRPO keeps R for a one-sample group (verl's mean 0)
    adv = _seed([1.0, 1, 1, 0, 0.7], [0, 0, 0, 1, -1], ids=[2, 2, 2, 2, 8], alpha=1.0)
    assert adv[4].item() == pytest.approx(0.7)
    x = 0.836988 / math.log(4)
    torch.testing.assert_close(adv[:4], _t([0.25, 0.25, 0.25, -0.75]) * (1 - x), atol=1e-5, rtol=0)


def test_seed_grpo_batch_equals_per_group_calls():
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    ids = [9, 4, 9, 4, 9, 4, 9, 4]
    clusters = [0, 0, 0, 1, 2, 1, -1, 0]
    seq_logp = [-3.0, -1.0, -2.5, -4.0, -0.5, -7.0, -1.5, -2.0]
    lengths = [3.0, 1.0, 5.0, 2.0, 1.0, 7.0, 3.0, 4.0]
    opts = dict(probability="likelihood", alpha=0.8)
    adv = seed_grpo(
        _t(rewards), _ids(ids), cluster_ids=_ids(clusters), seq_logp=_t(seq_logp), lengths=_t(lengths), **opts
    )
    for g in (4, 9):
        rows = [i for i, x in enumerate(ids) if x == g]
        one = seed_grpo(
            _t([rewards[i] for i in rows]),
            _ids([0] * len(rows)),
            cluster_ids=_ids([clusters[i] for i in rows]),
            seq_logp=_t([seq_logp[i] for i in rows]),
            lengths=_t([lengths[i] for i in rows]),
            **opts,
        )
        torch.testing.assert_close(adv[rows], one)


def test_seed_grpo_likelihood_mode_hand_value():
    # clusters {0,1} {2,3}, l = seq_logp (no length normalisation) = [0, 0, -ln 3, -ln 3]
    # => p = [2 / (2 + 2/3), (2/3) / (2 + 2/3)] = [0.75, 0.25], same as count mode of case 1's p
    seq_logp = _t([0.0, 0.0, -math.log(3), -math.log(3)])
    adv = seed_grpo(
        _t([1, 1, 0, 0]),
        _ids([0] * 4),
        cluster_ids=_ids([0, 0, 1, 1]),
        seq_logp=seq_logp,
        length_normalize=False,
    )
    torch.testing.assert_close(adv, _t([0.5, 0.5, -0.5, -0.5]) * 0.69812, atol=1e-5, rtol=0)
    count = _seed([1, 1, 0, 0], [0, 0, 1, 1])
    assert not torch.allclose(adv, count)


def test_seed_grpo_non_finite_log_likelihood_falls_back_to_count():
    rewards, clusters, ids = [1, 1, 1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1, 1, 1]
    seq_logp = [-math.inf, -1.0, -2.0, -9.0, -1.0, -2.0, -3.0, -40.0]
    adv = seed_grpo(_t(rewards), _ids(ids), cluster_ids=_ids(clusters), seq_logp=_t(seq_logp), lengths=_t([1.0] * 8))
    count = _seed(rewards, clusters, ids)
    # group 0 holds -inf: count mode, case 1's values
    torch.testing.assert_close(adv[:4], _t([0.17453, 0.17453, 0.17453, -0.52359]), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv[:4], count[:4])
    # group 1 is finite and keeps likelihood mode
    assert not torch.allclose(adv[4:], count[4:])
    assert torch.isfinite(adv).all()
    nan = seed_grpo(
        _t(rewards[:4]),
        _ids([0] * 4),
        cluster_ids=_ids(clusters[:4]),
        seq_logp=_t([math.nan, 0, 0, 0]),
        lengths=_t([1.0] * 4),
    )
    torch.testing.assert_close(nan, count[:4])


def test_seed_grpo_x_is_clamped_to_one():
    # likelihood cluster_mean: p = [~1, e^-20] => SE ~ 10 > log 2; x = clamp(0.5 * 10 / ln 2) = 1
    kwargs = dict(cluster_ids=_ids([0, 1]), seq_logp=_t([0.0, -20.0]), length_normalize=False)
    linear = seed_grpo(_t([1.0, 0.0]), _ids([0, 0]), **kwargs)
    torch.testing.assert_close(linear, _t([0.0, 0.0]), rtol=0, atol=0)
    inverse = seed_grpo(_t([1.0, 0.0]), _ids([0, 0]), f="inverse", **kwargs)
    torch.testing.assert_close(inverse, _t([0.25, -0.25]))


def test_seed_grpo_inputs_depend_on_probability():
    assert seed_grpo.inputs({}) == ("cluster_ids", "seq_logp", "lengths")
    assert seed_grpo.inputs({"probability": "count"}) == ("cluster_ids",)
    assert seed_grpo.inputs({"length_normalize": False}) == ("cluster_ids", "seq_logp")
    assert seed_grpo.state_cls is None


@pytest.mark.parametrize(
    "opts, word",
    [
        ({"f": "cubic"}, "cubic"),
        ({"base": "rloo"}, "rloo"),
        ({"probability": "nli"}, "nli"),
        ({"se_estimator": "max"}, "max"),
        ({"alpha": -0.1}, "alpha"),
        ({"gamma": math.nan}, "gamma"),
    ],
)
def test_seed_grpo_bad_options_raise(opts, word):
    with pytest.raises(ConfigError, match=word):
        _seed([1, 0], [0, 1], **opts)


def test_seed_grpo_likelihood_without_seq_logp_raises():
    with pytest.raises(ConfigError, match="seq_logp"):
        seed_grpo(_t([1, 0]), _ids([0, 0]), cluster_ids=_ids([0, 1]))
    with pytest.raises(ConfigError, match="lengths"):
        seed_grpo(_t([1, 0]), _ids([0, 0]), cluster_ids=_ids([0, 1]), seq_logp=_t([-1, -2]))


# --------------------------------------------------------------------------- copo
def _copo_reference(groups, *, majority=False, use_clusters=False, eps=1e-6):
    """Plain-Python COPO blend. groups: list of (rewards, cluster_ids)."""
    big_r, a_loc, w = [], [], []
    for r, c in groups:
        n = len(r)
        mean = statistics.mean(r)
        sd = statistics.stdev(r) if n > 1 else 0.0
        a_loc.append([0.0 if n < 2 or sd < eps else (x - mean) / (sd + eps) for x in r])
        keys = [k if k >= 0 else ("none", i) for i, k in enumerate(c)]
        sizes = {k: keys.count(k) for k in dict.fromkeys(keys)}
        if majority:
            real = [k for k in sizes if not isinstance(k, tuple)]
            top = max(sizes.values())
            cands = sorted(k for k in real if sizes[k] == top) or [k for k in sizes if sizes[k] == top]
            k = cands[0]
            rows_k = [i for i in range(n) if keys[i] == k]
            share = sizes[k] / n
            big_r.append(share if statistics.mean(r[i] for i in rows_k) > 0 else -share)
        else:
            big_r.append(mean)
        if n < 2:
            w.append(0.0)
        elif use_clusters:
            w.append(-sum(s / n * math.log(s / n) for s in sizes.values()) / math.log(n))
        else:
            p = sum(x > 0 for x in r) / n
            w.append(0.0 if p in (0, 1) else -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2))
    mu, sd = statistics.mean(big_r), statistics.pstdev(big_r)
    a_glob = [0.0 if len(big_r) < 2 or sd < eps else (x - mu) / (sd + eps) for x in big_r]
    return [w[q] * a + (1 - w[q]) * a_glob[q] for q in range(len(groups)) for a in a_loc[q]]


def _copo(groups, **opts):
    rewards = [x for r, _ in groups for x in r]
    ids = [q for q, (r, _) in enumerate(groups) for _ in r]
    clusters = [x for _, c in groups for x in c]
    if opts.pop("with_clusters", False):
        opts["cluster_ids"] = _ids(clusters)
    return copo(_t(rewards), _ids(ids), **opts)


def test_copo_spec_case_1():
    adv = copo(_t([1, 1, 1, 1, 1, 0, 0, 0]), _ids([0] * 4 + [1] * 4))
    expected = [1, 1, 1, 1, 1.02820, -0.59436, -0.59436, -0.59436]
    torch.testing.assert_close(adv, _t(expected), atol=1e-4, rtol=0)
    assert ADVANTAGES.get("copo") is copo


def test_copo_spec_case_2_one_prompt_has_no_global_signal():
    adv = copo(_t([1, 0, 0, 0]), _ids([0] * 4))
    w = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert w == pytest.approx(0.81128, abs=1e-5)
    torch.testing.assert_close(adv, _t([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6) * w)
    # all R_q equal: global std 0 => A_glob = 0
    same = copo(_t([1, 0, 0, 0, 0, 0, 1, 0]), _ids([0] * 4 + [1] * 4))
    torch.testing.assert_close(same, torch.cat([adv, adv[[1, 2, 0, 3]]]))


def test_copo_spec_case_3_both_prompts_unanimous():
    adv = copo(_t([1, 1, 1, 1, 0, 0, 0, 0]), _ids([3] * 4 + [6] * 4))
    torch.testing.assert_close(adv, _t([1.0] * 4 + [-1.0] * 4), atol=1e-5, rtol=0)


def test_copo_sigmoid_gate():
    adv = copo(_t([1, 1, 1, 1, 1, 0, 0, 0]), _ids([0] * 4 + [1] * 4), gate="sigmoid")
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    w_a, w_b = sig(10 * (0 - 0.5)), sig(10 * (0.811278 - 0.5))
    expected = [1 - w_a] * 4 + [w_b * 1.5 - (1 - w_b)] + [w_b * -0.5 - (1 - w_b)] * 3
    torch.testing.assert_close(adv, _t(expected), atol=1e-4, rtol=0)


def test_copo_cluster_entropy_gate_hand_values():
    # prompt B: clusters {0,1}, {2}, {3} => H = (0.5 ln 2 + 2 * 0.25 ln 4) / ln 4 = 0.75
    groups = [([1, 1, 1, 1], [0, 0, 0, 0]), ([1, 1, 0, 0], [0, 0, 1, 2])]
    adv = _copo(groups, with_clusters=True)
    a = 0.5 / math.sqrt(1 / 3)
    expected = [1.0] * 4 + [0.75 * a - 0.25] * 2 + [-0.75 * a - 0.25] * 2
    torch.testing.assert_close(adv, _t(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv, _t(_copo_reference(groups, use_clusters=True)))


def test_copo_majority_reward_matches_reference():
    groups = [
        ([1, 1, 1, 1], [0, 0, 0, 0]),  # unanimous correct: R = +1
        ([0, 0, 1, 0], [0, 0, 1, 2]),  # majority answer (share 0.5) wrong: R = -0.5
        ([0, 0, 0, 0], [-1, -1, -1, -1]),  # no answers: singletons, R = -0.25, H = 1
        ([1, 0, 0, 1], [0, 1, 1, 0]),  # tie 2:2 -> smaller id 0 (correct): R = +0.5
        ([0, 1], [-1, 3]),  # tie 1:1, a real answer (correct) beats a no-answer row: R = +0.5
    ]
    adv = _copo(groups, with_clusters=True, global_reward="majority")
    torch.testing.assert_close(adv, _t(_copo_reference(groups, majority=True, use_clusters=True)))
    big_r = [1.0, -0.5, -0.25, 0.5, 0.5]
    mu, sd = statistics.mean(big_r), statistics.pstdev(big_r)
    # prompt 3 (no answers): H = 1 => pure local advantage, 0 for equal rewards
    torch.testing.assert_close(adv[8:12], torch.zeros(4))
    # prompt 1 (unanimous): H = 0 => pure global advantage
    torch.testing.assert_close(adv[:4], _t([(1.0 - mu) / sd] * 4), atol=1e-5, rtol=0)


def test_copo_singleton_groups_get_the_batch_baseline():
    adv = copo(_t([1.0, 0.0, 1.0]), _ids([0, 1, 2]))
    sd = statistics.pstdev([1.0, 0.0, 1.0])
    torch.testing.assert_close(adv, _t([(1 / 3) / sd, -(2 / 3) / sd, (1 / 3) / sd]), atol=1e-5, rtol=0)


def test_copo_random_batch_matches_reference():
    gen = torch.Generator().manual_seed(0)
    groups = []
    for q in range(6):
        n = 1 + q % 4
        r = torch.randint(0, 2, (n,), generator=gen).float().tolist()
        c = torch.randint(-1, 3, (n,), generator=gen).tolist()
        groups.append((r, c))
    torch.testing.assert_close(_copo(groups), _t(_copo_reference(groups)))
    torch.testing.assert_close(_copo(groups, with_clusters=True), _t(_copo_reference(groups, use_clusters=True)))


def test_copo_inputs_and_errors():
    assert copo.inputs({}) == ()
    assert copo.inputs({"global_reward": "majority"}) == ("cluster_ids",)
    assert copo.optional_inputs == ("cluster_ids",)
    with pytest.raises(ConfigError, match="cluster_ids"):
        copo(_t([1, 0]), _ids([0, 0]), global_reward="majority")
    with pytest.raises(ConfigError, match="'step'"):
        copo(_t([1, 0]), _ids([0, 0]), gate="step")
    with pytest.raises(ConfigError, match="'best'"):
        copo(_t([1, 0]), _ids([0, 0]), global_reward="best")
    with pytest.raises(ConfigError, match="kappa"):
        copo(_t([1, 0]), _ids([0, 0]), kappa=math.inf)
