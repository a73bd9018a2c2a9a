"""ScreenExplorer pieces: download-free screen embeddings, the exploration reward components
(checked against their formulas recomputed with numpy) and the online world model."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from mmpo_tasks.gui_agent.exploration import (
    COMPONENTS,
    ExplorationRewardConfig,
    change_reward,
    click_intent_reward,
    cosine_sim,
    curiosity_reward,
    diversity_reward,
    episode_rewards,
    intent_reward,
)
from mmpo_tasks.gui_agent.screen_embedding import ImageEmbedder, TextEmbedder, dom_text, text_under_box
from mmpo_tasks.gui_agent.world_model import ReplayBuffer, WorldModel


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _t(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


E1, E2 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
V60 = np.array([0.5, math.sqrt(3) / 2, 0.0])  # 60 degrees from E1
ZERO = np.zeros(3)


# -- embedders ---------------------------------------------------------------------------------
def test_image_embedding_is_the_centred_normalised_thumbnail():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    v = ImageEmbedder(grid=16).embed_one(img)
    # independent: 2x3 block means, channel-major, each channel centred, unit norm
    thumb = img.astype(np.float64).reshape(16, 2, 16, 3, 3).mean(axis=(1, 3)) / 255.0  # [16, 16, 3]
    thumb = thumb.transpose(2, 0, 1)
    thumb -= thumb.mean(axis=(1, 2), keepdims=True)
    want = thumb.reshape(-1) / np.linalg.norm(thumb)
    assert v.dtype == torch.float32 and v.shape == (768,)
    np.testing.assert_allclose(v.numpy(), want, atol=1e-6)


def test_image_embedder_same_different_uniform_and_batch():
    emb = ImageEmbedder()
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (210, 160, 3), dtype=np.uint8)
    b = a.copy()
    b[20:80, 30:120] = 0
    ea, ea2, eb = emb.embed([a, a.copy(), b])
    assert float(ea @ ea2) == pytest.approx(1.0, abs=1e-6)
    assert float(ea @ eb) < 0.99
    # uniform screens (sizes that do not divide the grid, so the pooling rounds) -> exactly zero
    for shape, colour in [((37, 53), (200, 200, 200)), ((210, 160), (255, 0, 10)), ((5, 7), (0, 0, 0))]:
        u = np.empty((*shape, 3), dtype=np.uint8)
        u[:] = colour
        z = emb.embed_one(u)
        assert torch.isfinite(z).all() and torch.count_nonzero(z) == 0
    # ...but one pixel one grey level off is a (unit) signal, not rounding noise
    u = np.full((211, 161, 3), 100, dtype=np.uint8)
    u[100, 50, 1] = 101
    assert float(emb.embed_one(u).norm()) == pytest.approx(1.0, abs=1e-5)
    batch = emb.embed([a, np.zeros((10, 12, 3), np.uint8)])
    assert batch.shape == (2, 768) and emb.embed([]).shape == (0, 768)
    with pytest.raises(ValueError):
        emb.embed_one(np.zeros((4, 4), np.uint8))


def _hashed(text: str, dim: int) -> np.ndarray:
    """The TextEmbedder spec re-implemented: words + space-padded char trigrams, crc32 buckets."""
    low = text.lower()
    feats = ["w:" + w for w in re.findall(r"\w+", low)]
    flat = " ".join(low.split())
    if flat:
        p = f" {flat} "
        feats += ["c:" + p[i : i + 3] for i in range(len(p) - 2)]
    v = np.zeros(dim)
    for f in feats:
        h = zlib.crc32(f.encode())
        v[h % dim] += -1.0 if h >= 2**31 else 1.0
    n = np.linalg.norm(v)
    return v / n if n else v


def test_text_embedding_matches_the_hashing_spec():
    emb = TextEmbedder(dim=64)
    for text in ["Click the Submit button", "  OK  ", "naïve café, 42!", "a"]:
        np.testing.assert_allclose(emb.embed_one(text).numpy(), _hashed(text, 64), atol=1e-6)
    assert emb.features("Hi  yo") == ["w:hi", "w:yo", "c: hi", "c:hi ", "c:i y", "c: yo", "c:yo "]
    idx, sign = emb.bucket("w:submit")
    h = zlib.crc32(b"w:submit")
    assert (idx, sign) == (h % 64, 1.0 if h < 2**31 else -1.0)


def test_text_embedder_similarities_and_empty_text():
    emb = TextEmbedder()
    a, a_upper, b, c, empty = emb.embed(["submit the form", "SUBMIT  the Form", "submit the order", "blue whale", ""])
    assert float(a @ a_upper) == pytest.approx(1.0, abs=1e-6)
    assert float(a @ a) == pytest.approx(1.0, abs=1e-6)
    assert float(a @ b) > float(a @ c) and float(a @ b) < 0.99
    assert torch.count_nonzero(empty) == 0


def test_text_hashing_is_stable_across_processes():
    texts = ["Click on the OK button", "type('hello')"]
    code = (
        "import json, sys; from mmpo_tasks.gui_agent.screen_embedding import TextEmbedder;"
        "print(json.dumps(TextEmbedder(128).embed(json.loads(sys.argv[1])).tolist()))"
    )
    mine = TextEmbedder(128).embed(texts)
    # this process's str hashes are salted at random; the child's with a fixed, different salt
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(texts)], env=env, capture_output=True, text=True, check=True
    )
    assert torch.equal(torch.tensor(json.loads(out.stdout)), mine)


# -- DOM text ----------------------------------------------------------------------------------
def _el(ref, tag, text, left, top, width, height, value=""):
    # MiniWoB gives coordinates as float32 arrays of shape [1]
    box = {
        k: np.array([v], dtype=np.float32)
        for k, v in zip(("left", "top", "width", "height"), (left, top, width, height))
    }
    return {"ref": ref, "tag": tag, "text": text, "value": value, **box}


DOM = [
    _el(1, "body", "", 0, 0, 160, 210),
    _el(-1, "t", "Click  the button", 5, 5, 120, 10),
    _el(2, "button", "Submit", 10, 50, 40, 20),
    _el(3, "input_text", "", 80, 50, 50, 20, value="abc"),
    _el(4, "span", "hidden", 10, 100, 0, 0),
]


def test_dom_text_and_text_under_box():
    assert dom_text(DOM) == "Click the button Submit abc"
    assert dom_text([]) == ""
    size = (160, 210)
    assert text_under_box(DOM, 30 / 160, 60 / 210, size) == "Submit"
    assert text_under_box(DOM, 100 / 160, 60 / 210, size) == "abc"
    assert text_under_box(DOM, 50 / 160, 70 / 210, size) == "Submit"  # edges count
    assert text_under_box(DOM, 10 / 160, 60 / 210, size) == "Submit"
    assert text_under_box(DOM, 9.5 / 160, 60 / 210, size) == ""
    assert text_under_box(DOM, 60 / 160, 60 / 210, size) == ""  # only the empty body
    assert text_under_box(DOM, 10 / 160, 100 / 210, size) == ""  # a zero-size element is not visible
    assert text_under_box(DOM, 2.0, 2.0, size) == ""  # off the page: not even the body
    assert text_under_box(DOM, 65 / 160, 60 / 210, size, half_box=16) == "Submit abc"


# -- reward components -------------------------------------------------------------------------
def test_cosine_sim_on_hand_made_vectors_and_zero_vectors():
    a = _t([E1, E1, E1, 3 * E1, ZERO, ZERO])
    b = _t([E1, E2, V60, -E1, E2, ZERO])
    np.testing.assert_allclose(cosine_sim(a, b).numpy(), [1, 0, 0.5, -1, 0, 1], atol=1e-6)
    np.testing.assert_allclose(cosine_sim(a, b, both_zero=0.0).numpy(), [1, 0, 0.5, -1, 0, 0], atol=1e-6)


def test_change_curiosity_and_intent_components():
    pre = _t([E1, E1, E1, ZERO])
    post = _t([E1, E2, V60, ZERO])
    np.testing.assert_allclose(change_reward(pre, post).numpy(), [0, 1, 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(curiosity_reward(post, pre).numpy(), [0, 1, 0.5, 0], atol=1e-6)
    intent = _t([E1, V60, E2, ZERO])
    # pre.intent + post.intent: 1+1, 0.5+cos(E2,V60), 0+cos(V60,E2), empty intent aligns with nothing
    want = [2.0, 0.5 + math.sqrt(3) / 2, math.sqrt(3) / 2, 0.0]
    np.testing.assert_allclose(intent_reward(pre, post, intent).numpy(), want, atol=1e-6)
    np.testing.assert_allclose(
        click_intent_reward(_t([V60, ZERO, E2, ZERO]), intent).numpy(), [0.5, 0, 1, 0], atol=1e-6
    )


def test_diversity_compares_with_all_earlier_states():
    rng = np.random.default_rng(2)
    states = rng.standard_normal((5, 6))  # s_0 (initial) .. s_4
    pre, post = states[:-1], states[1:]
    got = diversity_reward(_t(pre), _t(post)).numpy()
    for t in range(4):
        earlier = [states[0]] + [post[k] for k in range(t)]
        assert got[t] == pytest.approx(1 - np.mean([_cos(e, post[t]) for e in earlier]), abs=1e-5)
    assert got[0] == pytest.approx(1 - _cos(states[0], states[1]), abs=1e-5)
    # hand case: E1 -> E2 -> E1: the return to the start is not diverse
    np.testing.assert_allclose(diversity_reward(_t([E1, E2]), _t([E2, E1])).numpy(), [1.0, 0.5], atol=1e-6)


def _episode(rng, t=4, d=8, dt=6):
    def unit(n, k):
        x = rng.standard_normal((n, k))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    img, txt = unit(t + 1, d), unit(t + 1, dt)
    return {
        "pre_img": img[:-1],
        "post_img": img[1:],
        "pre_txt": txt[:-1],
        "post_txt": txt[1:],
        "pred_img": unit(t, d),
        "pred_txt": unit(t, dt),
        "intent_txt": unit(t, dt),
        "under_click_txt": unit(t, dt),
    }


def _expected_components(ep):
    t = len(ep["pre_img"])
    out = {}
    for kind in ("img", "txt"):
        name = "image" if kind == "img" else "text"
        pre, post, pred = ep[f"pre_{kind}"], ep[f"post_{kind}"], ep[f"pred_{kind}"]
        out[f"{name}_change"] = [1 - _cos(pre[i], post[i]) for i in range(t)]
        out[f"{name}_diversity"] = [1 - np.mean([_cos(pre[j], post[i]) for j in range(i + 1)]) for i in range(t)]
        out[f"{name}_curiosity"] = [1 - _cos(post[i], pred[i]) for i in range(t)]
    it = ep["intent_txt"]
    out["intent"] = [_cos(ep["pre_txt"][i], it[i]) + _cos(ep["post_txt"][i], it[i]) for i in range(t)]
    out["intent_click"] = [_cos(ep["under_click_txt"][i], it[i]) for i in range(t)]
    return {k: np.array(v) for k, v in out.items()}


def test_episode_rewards_sum_weights_task_and_invalid_steps():
    rng = np.random.default_rng(3)
    ep = _episode(rng)
    args = {k: _t(v) for k, v in ep.items()}
    valid = torch.tensor([True, False, True, True])
    task = torch.tensor([0.0, 0.0, 0.0, 0.8])
    want = _expected_components(ep)
    assert set(want) == set(COMPONENTS)

    total, comps = episode_rewards(**args, valid=valid, task_reward=task, cfg=ExplorationRewardConfig())
    for k in COMPONENTS:
        np.testing.assert_allclose(comps[k].numpy(), want[k], atol=1e-5, err_msg=k)
    unweighted = sum(want.values())
    np.testing.assert_allclose(total.numpy(), unweighted * valid.numpy(), atol=1e-5)
    assert total[1] == 0 and comps["image_change"][1] > 0  # components stay unmasked for logging

    weights = {k: float(i + 1) / 4 for i, k in enumerate(COMPONENTS)}
    cfg = ExplorationRewardConfig(**weights, use_task_reward=True, task_reward=2.0, invalid_zero=False)
    total, _ = episode_rewards(**args, valid=valid, task_reward=task, cfg=cfg)
    np.testing.assert_allclose(
        total.numpy(), sum(weights[k] * want[k] for k in COMPONENTS) + 2.0 * task.numpy(), atol=1e-5
    )

    no_wm = {**args, "pred_img": None, "pred_txt": None}
    total, comps = episode_rewards(
        **no_wm, valid=valid, task_reward=task, cfg=ExplorationRewardConfig(invalid_zero=False)
    )
    assert comps["image_curiosity"].abs().sum() == 0
    np.testing.assert_allclose(total.numpy(), unweighted - want["image_curiosity"] - want["text_curiosity"], atol=1e-5)


def test_empty_screens_are_not_rewarded_as_change():
    z = torch.zeros(3, 5)
    assert change_reward(z, z).abs().sum() == 0 and diversity_reward(z, z).abs().sum() == 0
    assert intent_reward(z, z, z).abs().sum() == 0


# -- world model -------------------------------------------------------------------------------
D, DT = 16, 8
ACTS = ["click(0.100, 0.500)", "click(0.700, 0.500)"]
MAPS = torch.tensor(
    np.random.default_rng(4).standard_normal((2, D + DT, D + DT)) / np.sqrt(D + DT), dtype=torch.float32
)


def _transitions(n, rng, random_post=False):
    pre_i = _t(rng.standard_normal((n, D)))
    pre_t = _t(rng.standard_normal((n, DT)))
    a = rng.integers(0, 2, n)
    post = torch.einsum("nij,nj->ni", MAPS[a], torch.cat([pre_i, pre_t], 1))
    if random_post:
        post = _t(rng.standard_normal(post.shape))
    return pre_i, pre_t, [ACTS[k] for k in a], post[:, :D], post[:, D:]


def _mse(wm, tr):
    pi, pt = wm.predict(*tr[:3])
    return float(((pi - tr[3]) ** 2).mean() + ((pt - tr[4]) ** 2).mean())


def _curiosity(wm, tr):
    pi, pt = wm.predict(*tr[:3])
    return float((curiosity_reward(tr[3], pi) + curiosity_reward(tr[4], pt)).mean())


def test_world_model_learns_the_dynamics_and_curiosity_drops_for_seen_transitions():
    rng = np.random.default_rng(5)
    wm = WorldModel(D, DT, action_dim=64, seed=0)
    seen = _transitions(384, rng)
    wm.add(*seen)
    err0, cur0 = _mse(wm, seen), _curiosity(wm, seen)
    for _ in range(12):  # 12 episodes' worth of ScreenExplorer's 3 epochs
        stats = wm.fit(epochs=3)
    assert stats["steps"] == 3 * 12 and stats["loss"] == pytest.approx(stats["img_loss"] + stats["txt_loss"])
    assert _mse(wm, seen) < err0 / 10
    same_dynamics, novel = _transitions(256, rng), _transitions(256, rng, random_post=True)
    assert _curiosity(wm, seen) < 0.2 * cur0
    assert _curiosity(wm, seen) < _curiosity(wm, same_dynamics) < 0.5 * _curiosity(wm, novel)


def test_world_model_is_deterministic_and_leaves_the_global_rng_alone():
    tr = _transitions(100, np.random.default_rng(6))
    state = torch.random.get_rng_state()
    a, b, c = WorldModel(D, DT, seed=3), WorldModel(D, DT, seed=3), WorldModel(D, DT, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for wm in (a, b, c):
        wm.add(*tr)
        wm.fit(epochs=2, batch_size=16)
    for (k, pa), pb, pc in zip(a.net.state_dict().items(), b.net.state_dict().values(), c.net.state_dict().values()):
        assert torch.equal(pa, pb), k
        assert not torch.equal(pa, pc), k


def test_world_model_state_dict_round_trip_resumes_identically():
    rng = np.random.default_rng(7)
    a = WorldModel(D, DT, seed=1, capacity=64)
    a.add(*_transitions(80, rng))
    a.fit(epochs=1, batch_size=16)
    b = WorldModel(D, DT, seed=99, capacity=8)
    b.load_state_dict(a.state_dict())
    assert len(b.buffer) == 64 and b.buffer.capacity == 64
    probe = _transitions(5, rng)
    for x, y in zip(a.predict(*probe[:3]), b.predict(*probe[:3])):
        assert torch.equal(x, y)
    # optimizer, shuffling generator and buffer came along: training continues in lockstep
    more = _transitions(10, rng)
    for wm in (a, b):
        wm.add(*more)
        wm.fit(epochs=2, batch_size=16, lr=5e-4)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError):
        WorldModel(D + 1, DT).load_state_dict(a.state_dict())


def test_replay_buffer_keeps_the_last_transitions_and_action_forms_agree():
    buf = ReplayBuffer(capacity=4)
    for i in range(3):
        ids = torch.arange(3 * i, 3 * i + 3, dtype=torch.float32)[:, None]
        buf.add(ids.repeat(1, D), ids.repeat(1, DT), ids.repeat(1, 5), ids.repeat(1, D), ids.repeat(1, DT))
    assert len(buf) == 4 and buf.data["pre_img"][:, 0].tolist() == [5, 6, 7, 8]
    buf.add(torch.zeros(D), torch.zeros(DT), torch.zeros(5), torch.zeros(D), torch.zeros(DT))  # one transition
    assert buf.data["action"][:, 0].tolist() == [6, 7, 8, 0]
    with pytest.raises(ValueError):
        buf.add(torch.zeros(2, D + 1), torch.zeros(2, DT), torch.zeros(2, 5), torch.zeros(2, D), torch.zeros(2, DT))
    wm = WorldModel(D, DT)
    tr = _transitions(3, np.random.default_rng(8))
    assert wm.fit() == {}
    for x, y in zip(wm.predict(*tr[:3]), wm.predict(tr[0], tr[1], wm.embed_actions(tr[2]))):
        assert torch.equal(x, y) and x.shape[0] == 3
