"""ARES / AEPO reward pieces of the vlm_reasoning plugin (code shawn0728/ARES), checked by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmpo.errors import DataError
from mmpo_tasks.vlm_reasoning.ares import (
    TRIGGER_WORDS,
    AresRewardState,
    HWEThreshold,
    aepo_entropy_reward,
    bucket_targets,
    difficulty_buckets,
    hierarchical_entropy_reward,
    hwe_count,
    load_trigger_words,
    normalize_token,
    update_alpha,
    validation_targets,
    window_percentiles,
)


def sig(x: float, temp: float) -> float:
    return 1.0 / (1.0 + math.exp(-x / temp))


# ----------------------------------------------------------------------------- lexicon
def test_trigger_words():
    for w in (
        "alternatively",
        "perhaps",
        "reconsider",
        "therefore",
        "validate",
        "wait",
        "however",
        "hmm",
        "check",
        "verify",
    ):
        assert w in TRIGGER_WORDS
    assert 90 <= len(TRIGGER_WORDS) <= 150
    assert all(w == w.lower() and w.isalpha() for w in TRIGGER_WORDS)
    assert "the" not in TRIGGER_WORDS and "#" not in "".join(TRIGGER_WORDS)


def test_load_trigger_words_errors(tmp_path):
    good = tmp_path / "ok.txt"
    good.write_text("# comment\n\nWait\n  hmm  \n", encoding="utf-8")
    assert load_trigger_words(good) == frozenset({"wait", "hmm"})
    bad = tmp_path / "bad.txt"
    bad.write_text("wait\nlet me see\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.txt:2: .*'let me see'"):
        load_trigger_words(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(DataError, match="no trigger words"):
        load_trigger_words(empty)


def test_normalize_token():
    assert normalize_token("\u0120Wait") == "wait"  # byte-level BPE space marker
    assert normalize_token("\u2581Hmm,") == "hmm"  # sentencepiece marker + punctuation
    assert normalize_token(" Therefore") == "therefore"
    assert normalize_token("(verify).") == "verify"
    assert normalize_token("\u201cPerhaps\u201d") == "perhaps"
    assert normalize_token("Wait,", strip_punctuation=False) == "wait,"  # ARES's exact rule
    assert normalize_token("\u0120Wait ", strip_punctuation=False) == "wait"


# ----------------------------------------------------------------------------- HWE count
def _matrix():
    # row 0: all 8 tokens valid; row 1: 6 valid tokens, then padding (entropy 9, masked out)
    H = torch.tensor(
        [
            [0.0, 1.0, 2.0, 1.0, 2.0, 0.5, 0.5, 0.5],
            [3.0, 2.0, 2.0, 0.0, 2.0, 0.0, 9.0, 9.0],
        ]
    )
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    texts = [
        ["\u0120Wait", "x", "x", "x", "x", " However", "x", "x"],
        ["hmm", "Check", "a", "b", "c", "d"],
    ]
    return H, mask, texts


def test_hwe_count_by_hand():
    H, mask, texts = _matrix()
    # row 0: 'Wait' at t=0, window t+1..t+4 = (1, 2, 1, 2) -> 1.5; 'However' at t=5 has only
    #        2 tokens after it: no complete window, so it is neither counted nor invalid.
    # row 1: 'hmm' at t=0: (2, 2, 0, 2) -> 1.5; 'Check' at t=1: (2, 0, 2, 0) -> 1.0
    count, soft, invalid = hwe_count(H, mask, texts, tau=1.25)
    assert count.tolist() == [1, 1] and invalid.tolist() == [0, 1]
    assert torch.allclose(soft, torch.tensor([1.5 - 1.25, 1.5 - 1.25]))
    # a mean equal to tau counts (>=)
    count, soft, invalid = hwe_count(H, mask, texts, tau=1.5)
    assert count.tolist() == [1, 1] and invalid.tolist() == [0, 1]
    assert soft.tolist() == [0.0, 0.0]
    count, soft, invalid = hwe_count(H, mask, texts, tau=0.5)
    assert count.tolist() == [1, 2] and invalid.tolist() == [0, 0]
    assert torch.allclose(soft, torch.tensor([1.0, 1.0 + 0.5]))
    count, soft, invalid = hwe_count(H, mask, texts, tau=2.0)
    assert count.tolist() == [0, 0] and invalid.tolist() == [1, 2] and soft.tolist() == [0.0, 0.0]


def test_hwe_count_options():
    H, mask, texts = _matrix()
    # paper window t..t+3: row 0 'Wait' (0,1,2,1) -> 1.0, 'However' t=5 (0.5,0.5,0.5 + beyond) incomplete;
    # row 1 'hmm' (3,2,2,0) -> 1.75, 'Check' (2,2,0,2) -> 1.5
    count, soft, invalid = hwe_count(H, mask, texts, tau=1.25, include_current=True)
    assert count.tolist() == [0, 2] and invalid.tolist() == [1, 0]
    assert torch.allclose(soft, torch.tensor([0.0, 0.5 + 0.25]))
    # window 2 after t: 'However' at t=5 now has (0.5, 0.5) -> 0.5
    count, _, invalid = hwe_count(H, mask, texts, tau=0.5, window=2)
    assert count.tolist() == [2, 2] and invalid.tolist() == [0, 0]
    # a custom lexicon
    count, _, invalid = hwe_count(H, mask, texts, tau=0.0, lexicon={"x"})
    # row 0: 'x' at t=1..3 have complete windows (t+4 <= 7); t=4, 6, 7 do not
    assert count.tolist() == [3, 0] and invalid.tolist() == [0, 0]
    # ARES's exact normalisation keeps the comma: 'Wait,' is no trigger then
    texts2 = [["Wait,"] + ["x"] * 7, ["a"] * 6]
    assert hwe_count(H, mask, texts2, tau=0.0)[0].tolist() == [1, 0]
    assert hwe_count(H, mask, texts2, tau=0.0, strip_punctuation=False)[0].tolist() == [0, 0]


def test_hwe_count_errors():
    H, mask, texts = _matrix()
    with pytest.raises(ValueError, match="row 1 has 5 tokens"):
        hwe_count(H, mask, [texts[0], texts[1][:5]], tau=1.0)
    with pytest.raises(ValueError, match="3 rows, token_entropy has 2"):
        hwe_count(H, mask, texts[:1] * 3, tau=1.0)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        hwe_count(H, mask[:, :4], texts, tau=1.0)


# ----------------------------------------------------------------------------- threshold
def test_window_percentiles_by_hand():
    H = torch.tensor(
        [
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            [7.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        ]
    )
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [0] * 6])
    got = window_percentiles(H, mask, window=2, q=95.0)
    # row 0: complete windows t=0..3 -> (1.5, 2.5, 3.5, 4.5); t=4, 5 take their mean 3.0.
    # sorted (1.5, 2.5, 3, 3, 3.5, 4.5); position 0.95 * 5 = 4.75 -> 3.5 + 0.75 * (4.5 - 3.5)
    # row 1: 2 tokens, no complete window -> every value is the first token's entropy, 7.
    # row 2: empty -> 0
    assert torch.allclose(got, torch.tensor([3.5 + 0.75 * 1.0, 7.0, 0.0]))
    # median instead of the 95th percentile: (3 + 3) / 2
    assert window_percentiles(H[:1], mask[:1], window=2, q=50.0).item() == pytest.approx(3.0)


def test_threshold_ema():
    th = HWEThreshold()
    assert th.tau == 1.5  # ARES fallback
    assert th.update(torch.tensor([1.0, 2.0, 4.0])) == pytest.approx(2.0)  # seeded by the first median
    assert th.update([3.0, 5.0]) == pytest.approx(0.99 * 2.0 + 0.01 * 4.0)  # median of two: mean
    assert th.update([]) == pytest.approx(2.02)  # nothing to fold in
    th2 = HWEThreshold(tau=1.2, seed_from_first_batch=False)
    assert th2.update([2.0]) == pytest.approx(0.99 * 1.2 + 0.01 * 2.0)
    d = th.state_dict()
    assert json.loads(json.dumps(d)) == d
    restored = HWEThreshold()
    restored.load_state_dict(json.loads(json.dumps(d)))
    assert restored.update([10.0]) == th.update([10.0]) == pytest.approx(0.99 * 2.02 + 0.1)
    with pytest.raises(ValueError, match="finite"):
        th.update([float("nan")])


# ----------------------------------------------------------------------------- buckets
def test_difficulty_buckets_thresholds():
    # groups of 3: 3/3, 2/3 (exactly 2/3 -> easy), 1/3 (exactly 1/3 -> medium), 0/3
    correct = torch.tensor([1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    assert difficulty_buckets(correct, groups) == ["easy"] * 6 + ["medium"] * 3 + ["hard"] * 3
    # groups of 6 with ids out of order: 4/6 easy, 2/6 medium, 1/6 hard, 3/6 medium
    correct = torch.tensor([1, 1, 1, 1, 0, 0] + [1, 1, 0, 0, 0, 0] + [1, 0, 0, 0, 0, 0] + [1, 1, 1, 0, 0, 0]).bool()
    groups = [9] * 6 + [2] * 6 + ["p"] * 6 + [5] * 6
    assert difficulty_buckets(correct, groups) == ["easy"] * 6 + ["medium"] * 6 + ["hard"] * 6 + ["medium"] * 6
    # interleaved members of a group
    assert difficulty_buckets(torch.tensor([1, 0, 0, 1]), torch.tensor([4, 7, 4, 7])) == ["medium"] * 4
    with pytest.raises(ValueError, match="group_ids"):
        difficulty_buckets(torch.tensor([1, 0]), torch.tensor([0]))


# ----------------------------------------------------------------------------- reward
def test_reward_easy_correct():
    # T = 10: m = max(1, 0.15 * 10) = 1.5, kappa = 2, cap = 0.5
    state = AresRewardState()
    hwe = torch.tensor([13, 20, 11, 5])
    r = hierarchical_entropy_reward(torch.ones(4), hwe, ["easy"] * 4, state, targets={"easy": 10})
    # 13: over = 3 - 1.5 = 1.5 <= 2 -> h = 1.5^2 / 4; penalty h / (1.5 + 2) * 0.5
    # 20: over = 8.5 > 2 -> h = 8.5 - 1 = 7.5 -> 7.5 / 3.5 * 0.5 > cap -> -cap
    # 11 (within the margin) and 5 (below target): no penalty
    expected = [-(1.5**2 / 4) / 3.5 * 0.5, -0.5, 0.0, 0.0]
    assert torch.allclose(r, torch.tensor(expected))


def test_reward_medium_correct():
    # T = 8: m = 2, kappa = 3, cap = 0.5
    state = AresRewardState()
    r = hierarchical_entropy_reward(torch.ones(3), [3, 14, 9], ["medium"] * 3, state, targets={"medium": 8})
    # 3: |delta| - m = 3 <= 3 -> h = 9 / 6 = 1.5 -> 1.5 / 5 * 0.5
    # 14: 6 - 2 = 4 > 3 -> h = 4 - 1.5 = 2.5 -> 2.5 / 5 * 0.5
    assert torch.allclose(r, torch.tensor([-(9 / 6) / 5 * 0.5, -2.5 / 5 * 0.5, 0.0]))


def test_reward_easy_and_medium_wrong():
    state = AresRewardState()
    r = hierarchical_entropy_reward(
        torch.zeros(4),
        [14, 5, 12, 4],
        ["easy", "easy", "medium", "medium"],
        state,
        targets={"easy": 10, "medium": 8},
    )
    # easy: m = 1.5, temp 2, factor 0.6; 14 -> over 2.5; 5 -> over 0 -> sigmoid(0) = 1/2
    # medium: m = 2, temp 2.5, factor 0.8; 12 -> over 2; 4 -> over 0
    expected = [sig(2.5, 2.0) * 0.5 * 0.6, 0.5 * 0.5 * 0.6, sig(2.0, 2.5) * 0.5 * 0.8, 0.5 * 0.5 * 0.8]
    assert torch.allclose(r, torch.tensor(expected))


def test_reward_hard_correct():
    # T = 20: m = max(1, 0.35 * 20) = 7, kappa = 4, temp 3, cap = 0.5 * 1.2 = 0.6
    state = AresRewardState()
    r = hierarchical_entropy_reward(torch.ones(4), [15, 13, 10, 0], ["hard"] * 4, state, targets={"hard": 20})
    expected = [
        sig(-5 + 7, 3.0) * 0.6,  # delta = -5 >= -7: bonus
        sig(0.0, 3.0) * 0.6,  # delta = -m exactly: still the bonus branch, 0.3
        -0.5 * (3**2 / 8) / 11 * 0.6,  # delta = -10: -delta - m = 3 <= 4 -> h = 9 / 8
        -min(0.6, 0.5 * (13 - 2) / 11 * 0.6),  # delta = -20: 13 > 4 -> h = 11
    ]
    assert torch.allclose(r, torch.tensor(expected))


def test_reward_hard_wrong_and_alpha_cap():
    state = AresRewardState()
    state.alpha["hard"] = 2.0  # cap = 2 * 1.2
    r = hierarchical_entropy_reward(torch.zeros(2), [30, 25], ["hard", "hard"], state, targets={"hard": 20})
    # 30: over = 10 - 7 = 3 -> sigmoid(3 / 3); 25: over 0 -> 1/2
    assert torch.allclose(r, torch.tensor([sig(3.0, 3.0) * 2.4, 0.5 * 2.4]))


def test_reward_default_targets_are_rounded_bucket_means():
    state = AresRewardState()
    # easy counts (2, 3): mean 2.5 -> round half to even -> 2; m = max(1, 0.3) = 1
    # hard counts (0, 0, 1): mean 1/3 -> 0; m = max(1, 0.35 * max(0, 1)) = 1
    hwe = torch.tensor([2, 3, 0, 0, 1])
    buckets = ["easy", "easy", "hard", "hard", "hard"]
    assert bucket_targets(hwe, buckets) == {"easy": 2, "hard": 0}
    assert bucket_targets([3, 4], ["medium", "medium"]) == {"medium": 4}  # 3.5 -> 4
    correct = torch.tensor([1, 1, 1, 0, 1])
    r = hierarchical_entropy_reward(correct, hwe, buckets, state)
    expected = [
        0.0,  # easy, delta 0
        0.0,  # easy, delta 1 = m
        sig(0 + 1, 3.0) * 0.6,  # hard correct, delta 0 >= -1
        sig(0.0, 3.0) * 0.6,  # hard wrong, over = max(0 - 1, 0)
        sig(1 + 1, 3.0) * 0.6,  # hard correct, delta 1
    ]
    assert torch.allclose(r, torch.tensor(expected))
    # state targets are used when no targets are passed; a missing bucket is an error
    state.targets = {"easy": 10.0, "hard": 20.0}
    r2 = hierarchical_entropy_reward(torch.ones(1), [13], ["easy"], state)
    assert r2.item() == pytest.approx(-(1.5**2 / 4) / 3.5 * 0.5)
    with pytest.raises(ValueError, match="medium"):
        hierarchical_entropy_reward(torch.ones(1), [13], ["medium"], state)


def test_update_alpha():
    state = AresRewardState()
    hwe = torch.tensor([11, 13, 8, 8, 14, 16])
    buckets = ["easy", "easy", "medium", "medium", "hard", "hard"]
    new = update_alpha(state, hwe, buckets, {"easy": 10, "medium": 8, "hard": 20})
    # easy: mean 12 - 10 = 2 -> 0.5 + 0.1; medium: 0; hard: 20 - 15 = 5 -> 0.5 + 0.25
    assert new == pytest.approx({"easy": 0.6, "medium": 0.5, "hard": 0.75})
    update_alpha(state, [100], ["easy"], {"easy": 0})  # clipped at 2
    update_alpha(state, [100], ["hard"], {"hard": 0})  # clipped at 0
    assert state.alpha == pytest.approx({"easy": 2.0, "medium": 0.5, "hard": 0.0})


def test_update_alpha_code_quirk_targets_from_the_batch():
    # targets = round(bucket mean): Delta = mean - round(mean), at most 0.5
    state = AresRewardState()
    update_alpha(state, [2, 3, 1, 2, 7, 7], ["easy", "easy", "hard", "hard", "medium", "medium"])
    # easy: 2.5 - 2 = 0.5; hard: round(1.5) = 2 -> 2 - 1.5 = 0.5; medium: 7 - 7 = 0
    assert state.alpha == pytest.approx({"easy": 0.525, "medium": 0.5, "hard": 0.525})


def test_aepo_step_updates_alpha_before_the_reward():
    state = AresRewardState(targets={"easy": 10.0, "medium": 8.0, "hard": 20.0})
    r, targets = aepo_entropy_reward(torch.tensor([0, 0]), [30, 30], ["hard", "hard"], state)
    assert targets == {"easy": 10.0, "medium": 8.0, "hard": 20.0}
    alpha = 0.5 + 0.05 * (20 - 30)  # 0.0: clipped at 0, so the bonus is 0
    assert state.alpha["hard"] == pytest.approx(max(alpha, 0.0))
    assert r.tolist() == [0.0, 0.0]
    state = AresRewardState()
    r, targets = aepo_entropy_reward(torch.tensor([1, 1]), [12, 12], ["medium", "medium"], state, targets={"medium": 8})
    cap = 0.5 + 0.05 * 4  # alpha after the update
    assert r.tolist() == pytest.approx([-min(cap, ((4 - 2) ** 2 / 6) / 5 * cap)] * 2)


def test_validation_targets_and_state_round_trip():
    assert validation_targets(torch.tensor([2, 12, 5])) == {"easy": int(2 + 3.5), "medium": 7, "hard": int(2 + 6.5)}
    state = AresRewardState(targets={"easy": 5.0, "medium": 7.0, "hard": 8.0})
    update_alpha(state, [9, 1], ["easy", "hard"])
    d = state.state_dict()
    assert json.loads(json.dumps(d)) == d
    restored = AresRewardState()
    restored.load_state_dict(json.loads(json.dumps(d)))
    assert restored.state_dict() == d
    args = (torch.tensor([1, 0]), [9, 1], ["easy", "hard"])
    assert torch.equal(hierarchical_entropy_reward(*args, state), hierarchical_entropy_reward(*args, restored))
