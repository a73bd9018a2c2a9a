"""clip_score on a tiny random open_clip model built offline from a local config + safetensors."""

import json

import open_clip  # noqa: E402 (the diffusion extra is part of dev)
import pytest
import torch
import torch.nn.functional as F

from mmpo.errors import ConfigError
from mmpo.rewards.clip_score import TINY_CLIP_CONFIG, ClipScore, build_tiny_clip, preprocess
from mmpo.rewards.image import build_image_rewards


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


def images(n, h=40, w=48, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a red square", "a blue circle", "a red square", "two cats", "a photo of a dog"]


def manual_cosine(cfg_path, weights_path, imgs, prompts):
    """Reference: open_clip model from the same files, normalised features, dot product."""
    from safetensors.torch import load_file

    net = open_clip.CLIP(**json.loads(cfg_path.read_text()))
    net.load_state_dict(load_file(str(weights_path)))
    net.eval()
    # shortest side (40) -> 32, long side 48 -> 38, centre crop 32 x 32 at column offset 3
    x = F.interpolate(imgs, size=(32, 38), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 1)[..., :, 3:35]
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    with torch.no_grad():
        fi = net.encode_image((x - mean) / std)
        ft = net.encode_text(open_clip.tokenize(prompts))
    fi, ft = fi / fi.norm(dim=-1, keepdim=True), ft / ft.norm(dim=-1, keepdim=True)
    return (fi * ft).sum(dim=-1)


def test_tiny_clip_files(tiny):
    cfg_path, weights_path = tiny
    assert json.loads(cfg_path.read_text()) == TINY_CLIP_CONFIG
    assert weights_path.suffix == ".safetensors" and weights_path.stat().st_size > 0
    # same seed, same weights; the global RNG is untouched
    state = torch.random.get_rng_state()
    _, again = build_tiny_clip(cfg_path.parent / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.read_bytes() == weights_path.read_bytes()


def test_cosine_matches_manual_and_batching(tiny):
    cfg_path, weights_path = tiny
    imgs = images(5)
    ref = manual_cosine(cfg_path, weights_path, imgs, PROMPTS)
    out5 = ClipScore(model=str(cfg_path), weights=str(weights_path), batch_size=5)(imgs, PROMPTS, [{}] * 5)
    out2 = ClipScore(model=str(cfg_path), weights=str(weights_path), batch_size=2)(imgs, PROMPTS, [{}] * 5)
    assert out5.dtype == torch.float32 and out5.shape == (5,)
    torch.testing.assert_close(out5, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out2, out5, atol=1e-6, rtol=0)
    assert out5.abs().max() <= 1
    assert not torch.allclose(out5, out5[0].expand(5))  # the images/prompts are told apart
    scaled = ClipScore(model=str(cfg_path), weights=str(weights_path), scale=2.5)(imgs, PROMPTS, [{}] * 5)
    torch.testing.assert_close(scaled, 2.5 * out5, atol=1e-5, rtol=0)


def test_through_the_reward_set(tiny):
    cfg_path, weights_path = tiny
    spec = {"name": "clip_score", "model": str(cfg_path), "weights": str(weights_path), "weight": 2.0}
    rs = build_image_rewards([spec])
    imgs = images(3, 32, 32, seed=1)
    out = rs(imgs, PROMPTS[:3], [{}] * 3)
    torch.testing.assert_close(out.rewards, 2 * out.components["clip_score"])
    ref = manual_cosine_square(cfg_path, weights_path, imgs, PROMPTS[:3])
    torch.testing.assert_close(out.components["clip_score"], ref, atol=1e-5, rtol=0)


def manual_cosine_square(cfg_path, weights_path, imgs, prompts):
    from safetensors.torch import load_file

    net = open_clip.CLIP(**json.loads(cfg_path.read_text()))
    net.load_state_dict(load_file(str(weights_path)))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    with torch.no_grad():
        fi = F.normalize(net.eval().encode_image((imgs - mean) / std), dim=-1)  # already 32 x 32: no resize
        ft = F.normalize(net.encode_text(open_clip.tokenize(prompts)), dim=-1)
    return (fi * ft).sum(dim=-1)


def test_pt_weights_and_state_dict_wrapper(tiny, tmp_path):
    cfg_path, weights_path = tiny
    from safetensors.torch import load_file

    sd = load_file(str(weights_path))
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, pt)
    imgs = images(2, 32, 32)
    a = ClipScore(model=str(cfg_path), weights=str(pt))(imgs, PROMPTS[:2], [{}, {}])
    b = ClipScore(model=str(cfg_path), weights=str(weights_path))(imgs, PROMPTS[:2], [{}, {}])
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_errors_name_the_path_or_model(tiny, tmp_path):
    cfg_path, weights_path = tiny
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match=f"weights: file not found: {missing}"):
        ClipScore(model=str(cfg_path), weights=str(missing))
    with pytest.raises(ConfigError, match=r"task.rewards\[0\].weights: file not found: .*nope.safetensors"):
        build_image_rewards([{"name": "clip_score", "model": "ViT-B-32", "weights": str(missing)}])
    with pytest.raises(ConfigError, match=r"model: config file not found: .*missing.json"):
        ClipScore(model=str(tmp_path / "missing.json"), weights=str(weights_path))
    with pytest.raises(ConfigError, match="would download"):
        ClipScore(model="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", weights=str(weights_path))
    bad_arch = ClipScore(model="ViT-B-33", weights=str(weights_path))
    with pytest.raises(ConfigError, match=r"model: unknown open_clip architecture 'ViT-B-33'. Did you mean"):
        bad_arch(images(1, 32, 32), ["x"], [{}])
    other = tmp_path / "tiny_clip_e16.json"  # another architecture: the tiny weights do not fit it
    other.write_text(json.dumps({**TINY_CLIP_CONFIG, "embed_dim": 16}))
    with pytest.raises(ConfigError, match=r"weights: .*tiny_clip.safetensors does not fit model '.*_e16.json'"):
        ClipScore(model=str(other), weights=str(weights_path))(images(1, 32, 32), ["x"], [{}])
    clash = tmp_path / "ViT-B-32.json"  # a file shadowing a bundled architecture with another config
    clash.write_text(json.dumps(TINY_CLIP_CONFIG))
    with pytest.raises(ConfigError, match=r"already has a different config named 'ViT-B-32'; rename the file"):
        ClipScore(model=str(clash), weights=str(weights_path))(images(1, 32, 32), ["x"], [{}])
    bad_tag = ClipScore(model=str(cfg_path), weights=str(weights_path), tag="openai")
    with pytest.raises(ConfigError, match=r"tag: 'openai' is no open_clip pretrained tag of 'tiny_clip'"):
        bad_tag(images(1, 32, 32), ["x"], [{}])


def test_preprocess_modes():
    x = torch.rand(1, 3, 20, 40)
    cfg = {"size": (10, 10), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert preprocess(x, {**cfg, "resize_mode": "shortest"}).shape == (1, 3, 10, 10)
    squash = preprocess(x, {**cfg, "resize_mode": "squash", "interpolation": "bilinear"})
    ref = F.interpolate(x, size=(10, 10), mode="bilinear", antialias=True).clamp(0, 1) * 2 - 1
    torch.testing.assert_close(squash, ref)
    longest = preprocess(torch.ones(1, 3, 20, 40), {**cfg, "resize_mode": "longest"})
    assert longest.shape == (1, 3, 10, 10)
    # 20 x 40 -> 5 x 10, padded with black (fill 0 -> (0 - 0.5) / 0.5 = -1) above and below
    assert torch.all(longest[..., :2, :] == -1) and torch.all(longest[..., 7:, :] == -1)
    torch.testing.assert_close(longest[..., 2:7, :], torch.ones(1, 3, 5, 10))


def test_hf_style_open_clip_config_with_preprocess(tiny, tmp_path):
    """An ``open_clip_config.json`` ({model_cfg, preprocess_cfg}) loads via local-dir and uses its mean/std."""
    cfg_path, weights_path = tiny
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    )
    imgs = images(2, 32, 32, seed=3)
    rew = ClipScore(model=str(tmp_path / "open_clip_config.json"), weights=str(weights_path))
    out = rew(imgs, PROMPTS[:2], [{}, {}])
    # manual_cosine_square normalises with the OpenAI mean/std: shift the pixels so that it sees (x - 0.5) / 0.25
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    shifted = (imgs - 0.5) / 0.25 * std + mean
    ref = manual_cosine_square(cfg_path, weights_path, shifted, PROMPTS[:2])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    (tmp_path / "wrapped.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    with pytest.raises(ConfigError, match="name it open_clip_config.json"):
        ClipScore(model=str(tmp_path / "wrapped.json"), weights=str(weights_path))(imgs, PROMPTS[:2], [{}, {}])
