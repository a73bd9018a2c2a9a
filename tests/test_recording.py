"""Episode videos (GIF via Pillow, MP4 via PyAV) and the Wilson interval of success rates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmpo.rollout.recording import save_episode_video
from mmpo.stats import wilson_interval


def _frames(n=5, size=32):
    out = []
    for k in range(n):
        f = np.zeros((size, size, 3), dtype=np.uint8)
        f[:, : (k + 1) * size // n] = (255, 0, 0)
        out.append(f)
    return out


def test_gif_holds_every_distinct_frame(tmp_path):
    from PIL import Image

    frames = _frames()
    path = save_episode_video(frames, tmp_path / "ep.gif", fps=5)
    with Image.open(path) as im:
        assert im.n_frames == 5
        for k in range(5):
            im.seek(k)
            assert im.info["duration"] == 200
            assert np.array_equal(np.asarray(im.convert("RGB")), frames[k])
    assert not list(tmp_path.glob(".*tmp*"))


def test_mp4_decodes_to_the_frames(tmp_path):
    import av

    frames = _frames(6, 33)  # odd size: cropped to even for yuv420p
    path = save_episode_video(frames, tmp_path / "ep.mp4", fps=4)
    with av.open(str(path)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 6 and decoded[0].shape == (32, 32, 3)
    assert np.abs(decoded[-1].astype(int) - frames[-1][:32, :32].astype(int)).mean() < 12


def test_bad_videos_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        save_episode_video([], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="one size"):
        save_episode_video([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="unknown video format"):
        save_episode_video(_frames(), tmp_path / "a.avi")
    assert not (tmp_path / "a.avi").exists()


def test_wilson_interval_known_values():
    # Wilson (1927) score interval, z = 1.96
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    # symmetric around 0.5 and narrowing like 1/sqrt(n)
    w100 = np.subtract(*wilson_interval(50, 100)[::-1])
    w400 = np.subtract(*wilson_interval(200, 400)[::-1])
    assert w100 / w400 == pytest.approx(2.0, rel=0.02)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    assert math.isclose(sum(wilson_interval(30, 100)) / 2, (0.3 + 1.96**2 / 200) / (1 + 1.96**2 / 100), rel_tol=1e-9)
