"""Data hardness (DR-IRL, arXiv 2503.18991): (1 - cos(E(prompt), E(anchor))) / 2 with frozen encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmpo.errors import ConfigError, UnknownNameError
from mmpo.rewards.hardness import (
    TEXT_ENCODERS,
    ClipTextEncoder,
    HardnessCache,
    HashedTextEncoder,
    build_encoder,
    build_text_encoder,
    data_hardness,
)

VECTORS = {"x": [1.0, 0.0], "-x": [-1.0, 0.0], "y": [0.0, 2.0], "xy": [1.0, 1.0], "0": [0.0, 0.0]}


class TableEncoder:
    """A frozen encoder with known vectors; counts the texts it encodes."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, texts):
        self.seen += list(texts)
        return torch.tensor([VECTORS[t] for t in texts])


def test_formula_on_known_vectors():
    h = data_hardness(["x", "x", "x", "x", "x", "0"], ["x", "-x", "y", "xy", None, "x"], TableEncoder())
    # cos = 1, -1, 0, 1/sqrt(2); no anchor -> 0; a zero vector has cos 0 -> 0.5
    want = [0.0, 1.0, 0.5, (1 - 2**-0.5) / 2, 0.0, 0.5]
    assert h.dtype == torch.float32
    assert h.tolist() == pytest.approx(want, abs=1e-7)


def test_no_anchor_is_never_encoded():
    enc = TableEncoder()
    assert data_hardness(["x", "y"], [None, None], enc).tolist() == [0.0, 0.0]
    assert enc.seen == []


def test_hashed_identical_zero_and_unrelated_larger():
    enc = build_text_encoder("hashed")
    prompt = "How many mitotic figures are in this tissue image?"
    anchors = [prompt, "How many mitotic figures are in this tissue?", "Paint the fence green tomorrow morning."]
    h = data_hardness([prompt] * 3, anchors, enc)
    assert h[0] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < h[1] < h[2] <= 1.0
    # the hand formula on the encoder's own vectors
    a, b = enc([prompt])[0].double().numpy(), enc([anchors[2]])[0].double().numpy()
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert float(h[2]) == pytest.approx((1 - cos) / 2, abs=1e-6)
    assert data_hardness(["same"], ["same"], "hashed").tolist() == pytest.approx([0.0], abs=1e-6)


def test_hashed_features_by_hand():
    enc = HashedTextEncoder(dim=64)
    assert enc.features("Hi  yo") == ["w:hi", "w:yo", "c: hi", "c:hi ", "c:i y", "c: yo", "c:yo "]
    v = enc.embed_one("Hi  yo")
    want = np.zeros(64)
    for f in enc.features("Hi  yo"):
        i, s = enc.bucket(f)
        want[i] += s
    np.testing.assert_allclose(v.numpy(), want / np.linalg.norm(want), atol=1e-7)
    assert enc.embed_one("  ").abs().sum() == 0  # no feature: zero vector
    assert enc([]).shape == (0, 64)


def test_screenexplorer_embeds_text_with_the_same_encoder():
    """One implementation: the gui_agent plugin's TextEmbedder is this encoder."""
    gui = pytest.importorskip("mmpo_tasks.gui_agent.screen_embedding")
    assert gui.TextEmbedder is HashedTextEncoder
    texts = ["Click the OK button", "", "Déjà vu 42 ✓"]
    torch.testing.assert_close(HashedTextEncoder(dim=16)(texts), gui.TextEmbedder(dim=16).embed(texts))


def test_cache_encodes_once_and_round_trips():
    enc = TableEncoder()
    cache = HardnessCache(enc)
    h = cache(["p1", "p2", "p1"], ["x", "x", "x"], ["-x", "y", "-x"])
    assert h.tolist() == pytest.approx([1.0, 0.5, 1.0])
    assert enc.seen == ["x", "x", "-x", "y"]  # p1 once: prompts of the two rows, then anchors
    assert cache(["p2"], ["x"], ["-x"]).tolist() == [0.5]  # cached: the new anchor is not read
    assert len(enc.seen) == 4
    state = json.loads(json.dumps(cache.state_dict()))
    assert state == {"values": {"p1": 1.0, "p2": 0.5}}
    other_enc = TableEncoder()
    restored = HardnessCache(other_enc)
    restored.load_state_dict(state)
    assert restored(["p2", "p1"], ["x", "x"], ["x", "x"]).tolist() == [0.5, 1.0]
    assert other_enc.seen == []
    with pytest.raises(ValueError, match="p9"):
        restored.load_state_dict({"values": {"p9": "high"}})
    # read and written like a dict (the trainer fills it row by row)
    assert "p1" in restored and "p3" not in restored and len(restored) == 2
    restored["p3"] = 0.25
    assert restored["p3"] == 0.25 and restored.state_dict()["values"]["p3"] == 0.25


def test_encoder_options_are_checked(tmp_path):
    assert TEXT_ENCODERS.names() == ["clip", "hashed"]
    with pytest.raises(UnknownNameError, match="hashed"):
        build_text_encoder("hashd")
    assert isinstance(build_encoder(None), HashedTextEncoder)
    assert build_encoder({"name": "hashed", "dim": 8}).dim == 8
    with pytest.raises(ConfigError, match="expected a name"):
        build_encoder({"dim": 8})
    with pytest.raises(ConfigError, match=r"unknown option 'dimm'.*Did you mean 'dim'"):
        build_text_encoder("hashed", {"dimm": 8})
    with pytest.raises(ConfigError, match=r"'dim' = 0"):
        build_text_encoder("hashed", {"dim": 0})
    with pytest.raises(ConfigError, match=r"weights: file not found"):
        build_text_encoder("clip", {"model": "ViT-B-32", "weights": str(tmp_path / "none.safetensors")})
    with pytest.raises(ConfigError, match=r"required"):
        build_text_encoder("clip", {"model": "ViT-B-32"})


def test_clip_text_encoder_from_local_files(tmp_path):
    pytest.importorskip("open_clip")
    from mmpo.rewards.clip_score import build_tiny_clip

    cfg, weights = build_tiny_clip(tmp_path)
    enc = build_text_encoder("clip", {"model": str(cfg), "weights": str(weights), "batch_size": 2})
    assert isinstance(enc, ClipTextEncoder)
    texts = ["a red circle", "a red circle", "three blue squares", "an empty field"]
    e = enc(texts)
    assert e.shape == (4, 32) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    h = data_hardness(texts[:1] * 4, texts, enc)
    assert h[0] == pytest.approx(0.0, abs=1e-6) and h[1] == pytest.approx(0.0, abs=1e-6)
    assert (h[2:] > 0).all() and (h <= 1).all()
    cos = float(e[0] @ e[2])
    assert float(h[2]) == pytest.approx((1 - cos) / 2, abs=1e-6)
