"""Video reading (real decord and PyAV on tiny H.264 files), the synthetic event videos, and the
``video_clip`` / ``frame_at`` tools: timestamps, clamping, refusals, the reader cache."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmpo.errors import DataError
from mmpo.rollout.tools import TOOLS, ToolCallError, parse_tool_calls
from mmpo_tasks.video_frames.tools import FrameAtTool, ReaderCache, VideoClipTool
from mmpo_tasks.video_frames.video import (
    COLORS,
    SHAPES,
    VideoReader,
    nearest_color,
    shape_mask,
    synthetic_dataset,
    synthetic_event_video,
    write_video,
)

pytest.importorskip("av")
pytest.importorskip("decord")

BITS = 7  # frame index written as 7 black / white blocks of 8 x 8 px


def _index_video(path: Path, n: int, fps: float, gop: int) -> Path:
    """``n`` frames whose index is drawn in binary (block k white when bit k is set)."""
    frames = []
    for i in range(n):
        f = np.full((16, 8 * BITS, 3), 40, dtype=np.uint8)
        for k in range(BITS):
            if i >> k & 1:
                f[4:12, 8 * k : 8 * k + 8] = 220
        frames.append(f)
    return write_video(frames, path, fps, gop=gop)


def _decoded_index(frame: np.ndarray) -> int:
    return sum(1 << k for k in range(BITS) if frame[8, 8 * k + 4].mean() > 128)


def _color_at(image: Any, box: list[int]) -> str:
    """The palette colour of the 3 x 3 patch at the centre of ``box`` = [x0, y0, x1, y1]."""
    a = np.asarray(image, dtype=np.float64)
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    return nearest_color(a[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0))


def _colors_in(image: Any) -> dict[str, np.ndarray]:
    """Palette colour -> its pixel mask, for the colours covering >= 5% of the frame."""
    a = np.asarray(image, dtype=np.float64)
    names = list(COLORS) + ["grey"]
    ref = np.array([*COLORS.values(), (128, 128, 128)], dtype=np.float64)
    label = np.argmin(((a[:, :, None, :] - ref) ** 2).sum(-1), axis=-1)
    masks = {names[k]: label == k for k in range(len(COLORS))}
    return {c: m for c, m in masks.items() if m.mean() >= 0.05}


def _shape_of(mask: np.ndarray) -> str:
    """The shape whose template best matches (IoU) the mask's bounding box."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    box = max(crop.shape)
    crop = np.pad(crop, ((0, box - crop.shape[0]), (0, box - crop.shape[1])))

    def iou(s: str) -> float:
        t = shape_mask(s, box)
        return (t & crop).sum() / (t | crop).sum()

    return max(SHAPES, key=iou)


@pytest.fixture(scope="module")
def event_video(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return synthetic_event_video(tmp_path_factory.mktemp("ev") / "ev.mp4", seed=3)


@pytest.fixture(scope="module")
def index_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _index_video(tmp_path_factory.mktemp("idx") / "idx.mp4", n=90, fps=30, gop=8)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def test_decord_reads_the_event_frames_that_were_written(event_video: dict[str, Any]) -> None:
    with VideoReader(event_video["path"], backend="decord") as r:
        assert r.backend == "decord" and r.num_frames == 32 and r.fps == 4.0 and r.duration_s == 8.0
        for ev in event_video["events"]:
            inside = [ev["start_s"], (ev["start_s"] + ev["end_s"]) / 2, ev["end_s"] - 0.25]
            outside = [ev["start_s"] - 0.25, ev["end_s"]]  # the frames just before and just after
            frames = r.frames_at(inside + outside)
            assert [_color_at(f, ev["position"]) for f in frames] == [ev["color"]] * 3 + ["grey"] * 2, ev


def test_event_layout() -> None:
    for shape in SHAPES:
        assert shape_mask(shape, round(0.6 * 64)).sum() >= 64 * 64 / 6, shape
    for seed in range(20):
        rng = np.random.default_rng(seed)
        events = synthetic_event_video.__globals__["_event_times"](rng, 8.0, 4)
        assert events[0] >= 0.5 and events[-1] + 1.0 <= 7.5
        assert all(b - a >= 1.5 for a, b in zip(events, events[1:]))  # 1 s shown, >= 0.5 s apart


def test_event_video_metadata(event_video: dict[str, Any]) -> None:
    events = event_video["events"]
    assert len(events) == 3 and len({e["color"] for e in events}) == 3 and len({e["shape"] for e in events}) == 3
    for e in events:
        assert type(e["start_s"]) is float and e["end_s"] - e["start_s"] == 1.0
        x0, y0, x1, y1 = e["position"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_backends_give_the_same_frames(event_video: dict[str, Any], index_video: Path) -> None:
    times = [7.9, 0.0, 2.6, 2.6, 1.01, 4.5, 0.13, 2.0, 100.0, -1.0]
    for path in (event_video["path"], index_video):
        with VideoReader(path, backend="decord") as d, VideoReader(path, backend="pyav") as p:
            assert (d.num_frames, d.fps) == (p.num_frames, p.fps)
            a, b = d.frames_at(times), p.frames_at(times)
            for x, y in zip(a, b):
                assert np.array_equal(np.asarray(x), np.asarray(y))
    # and they are the right frames: the nearest index, decoded from the pixels
    with VideoReader(index_video, backend="decord") as d, VideoReader(index_video, backend="pyav") as p:
        rng = np.random.default_rng(0)
        times = list(rng.uniform(-0.1, 3.1, size=20))
        want = [min(max(int(np.floor(t * 30 + 0.5)), 0), 89) for t in times]
        for r in (d, p):
            assert [_decoded_index(np.asarray(f)) for f in r.frames_at(times)] == want, r.backend


def test_read_timings(event_video: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """Not an assertion on speed: prints the per-frame read time of each backend (pytest -s)."""
    times = [k / 4 for k in range(32)]
    for backend in ("decord", "pyav"):
        with VideoReader(event_video["path"], backend=backend) as r:
            t0 = time.perf_counter()
            for t in times[::3]:
                r.frames_at([t])
            single = (time.perf_counter() - t0) / len(times[::3])
            t0 = time.perf_counter()
            r.frames_at(times)
            batch = (time.perf_counter() - t0) / len(times)
        with capsys.disabled():
            print(
                f"\n{backend}: {single * 1e3:.2f} ms per single-frame read, "
                f"{batch * 1e3:.2f} ms per frame in a 32-frame read"
            )


def test_falls_back_to_pyav_without_decord(event_video: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    with VideoReader(event_video["path"]) as r:
        assert r.backend == "pyav" and "decord is not installed" in r.open_errors[0]
        assert r.num_frames == 32


def test_bad_files_raise_data_error_naming_the_path(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 50)
    for path in (tmp_path / "missing.mp4", garbage):
        for backend in ("auto", "decord", "pyav"):
            with pytest.raises(DataError, match=re.escape(str(path))):
                VideoReader(path, backend=backend)
    with pytest.raises(DataError, match="decord: .*pyav: "):
        VideoReader(garbage)  # both backends tried, both errors given

    import av

    audio = tmp_path / "audio.mp4"  # a valid file without a video stream
    with av.open(str(audio), "w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for pkt in [*s.encode(frame), *s.encode()]:
            c.mux(pkt)
    with pytest.raises(DataError, match="audio.mp4: cannot read video"):
        VideoReader(audio)


def test_resize_and_odd_sides(tmp_path: Path) -> None:
    frames = [np.full((33, 51, 3), 200, dtype=np.uint8) for _ in range(4)]
    path = write_video(frames, tmp_path / "odd.mp4", fps=2)
    with VideoReader(path) as r:
        assert r.frames_at([0.0])[0].size == (52, 34)  # padded to even sides
        assert r.frames_at([0.0], size=26)[0].size == (26, 17)  # longer side 26, aspect kept
        assert r.frames_at([0.0], size=104)[0].size == (104, 68)
    with pytest.raises(ValueError, match="frame 1"):
        write_video([frames[0], frames[0][:, :10]], tmp_path / "bad.mp4", fps=2)


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tools() -> tuple[VideoClipTool, FrameAtTool, ReaderCache]:
    cache = ReaderCache(maxsize=2)
    return VideoClipTool(max_frames=8, default_frames=4, cache=cache), FrameAtTool(cache=cache), cache


def test_tools_are_registered() -> None:
    assert TOOLS.get("video_clip") is VideoClipTool and TOOLS.get("frame_at") is FrameAtTool
    schema = VideoClipTool().schema()["function"]
    assert schema["name"] == "video_clip" and schema["parameters"]["additionalProperties"] is False


def test_clip_frames_and_timestamps(tools: Any, event_video: dict[str, Any]) -> None:
    clip, frame_at, _ = tools
    ctx = {"video": event_video["path"]}
    res = clip.run(clip.validate({"start_s": 1, "end_s": 4, "num_frames": 4}), ctx)
    assert not res.error and len(res.images) == 4
    assert "at 1.0 s, 2.0 s, 3.0 s, 4.0 s" in res.text and "8.0 s long" in res.text
    assert all(im.size == (112, 112) for im in res.images)
    res = clip.run({"start_s": 0, "end_s": 1}, {**ctx, "clip_size": 32})  # default num_frames: 4
    assert len(res.images) == 4 and res.images[0].size == (32, 32)
    assert "at 0.0 s, 0.25 s, 0.75 s, 1.0 s" in res.text  # 0, 1/3, 2/3, 1 s -> the nearest frames (4 fps)
    res = clip.run({"start_s": 2.0, "end_s": 2.1, "num_frames": 8}, ctx)  # 8 asked, 1 distinct frame there
    assert len(res.images) == 1 and "holds 1 distinct frame(s)" in res.text
    res = frame_at.run(frame_at.validate({"t_s": 3.6}), ctx)
    assert not res.error and len(res.images) == 1 and res.images[0].size == (224, 224)
    assert res.text == "Frame at 3.5 s (the video is 8.0 s long)."
    assert frame_at.run({"t_s": 3.6}, {**ctx, "frame_size": 48}).images[0].size == (48, 48)


def test_the_tools_show_the_event(tools: Any, event_video: dict[str, Any]) -> None:
    clip, frame_at, _ = tools
    ev = event_video["events"][0]
    mid = (ev["start_s"] + ev["end_s"]) / 2
    img = frame_at.run({"t_s": mid}, {"video": event_video["path"], "frame_size": 64}).images[0]
    assert _color_at(img, ev["position"]) == ev["color"]
    res = clip.run({"start_s": 0, "end_s": 7.75, "num_frames": 8}, {"video": event_video["path"], "clip_size": 64})
    seen = {c for im in res.images for c in _colors_in(im)}
    assert seen <= {e["color"] for e in event_video["events"]}


def test_out_of_range_times_are_clamped_and_said(tools: Any, event_video: dict[str, Any]) -> None:
    clip, frame_at, _ = tools
    ctx = {"video": event_video["path"]}
    res = clip.run(clip.validate({"start_s": -3, "end_s": 100, "num_frames": 2}), ctx)
    assert not res.error and len(res.images) == 2
    assert "start_s=-3 clamped to 0.0 s" in res.text and "end_s=100 clamped to 8.0 s" in res.text
    assert "at 0.0 s, 7.75 s" in res.text
    res = frame_at.run({"t_s": 1e12}, ctx)
    assert not res.error and "t_s=1e+12 clamped to 8.0 s" in res.text and "Frame at 7.75 s" in res.text
    res = clip.run({"start_s": 20, "end_s": 30}, ctx)  # all past the end: one frame, said
    assert len(res.images) == 1 and "start_s=20 clamped" in res.text and "end_s=30 clamped" in res.text
    text = '<tool_call>{"name": "frame_at", "arguments": {"t_s": -Infinity}}</tool_call>'  # Python's json accepts it
    (call,) = parse_tool_calls(text, {"frame_at": frame_at})
    res = frame_at.run(call.arguments, ctx)
    assert not res.error and "t_s=-inf clamped to 0.0 s" in res.text


def test_model_mistakes_are_error_results(tools: Any, event_video: dict[str, Any]) -> None:
    clip, frame_at, _ = tools
    ctx = {"video": event_video["path"]}
    res = clip.run({"start_s": 5, "end_s": 2}, ctx)
    assert res.error and not res.images and "end_s=2 is before start_s=5" in res.text
    res = clip.run({"start_s": 0, "end_s": 2, "num_frames": 9}, ctx)
    assert res.error and "1..8" in res.text
    with pytest.raises(ToolCallError, match="maximum of 8"):
        clip.validate({"start_s": 0, "end_s": 2, "num_frames": 9})
    with pytest.raises(ToolCallError, match="minimum of 1"):
        clip.validate({"start_s": 0, "end_s": 2, "num_frames": 0})
    # Python's json accepts NaN: the schema lets it through, the tool refuses it
    (call,) = parse_tool_calls(
        '<tool_call>{"name": "frame_at", "arguments": {"t_s": NaN}}</tool_call>', {"frame_at": frame_at}
    )
    res = frame_at.run(call.arguments, ctx)
    assert res.error and "NaN" in res.text
    assert clip.run({"start_s": "1", "end_s": 2}, ctx).error  # run without validate: still no raise


@pytest.mark.parametrize("extra", [{"path": "../../etc/passwd"}, {"url": "http://x/v.mp4"}, {"video": "/etc/passwd"}])
def test_arguments_naming_a_file_are_refused(tools: Any, extra: dict[str, str]) -> None:
    clip, frame_at, cache = tools
    with pytest.raises(ToolCallError, match="Additional properties are not allowed"):
        frame_at.validate({"t_s": 1, **extra})
    with pytest.raises(ToolCallError, match="Additional properties are not allowed"):
        clip.validate({"start_s": 0, "end_s": 1, **extra})
    body = '{"name": "frame_at", "arguments": {"t_s": 1, "%s": "%s"}}' % next(iter(extra.items()))
    with pytest.raises(ToolCallError):
        parse_tool_calls(f"<tool_call>{body}</tool_call>", {"frame_at": frame_at})
    # even when run is called with such a key, only the context's video would be read
    res = frame_at.run({"t_s": 1, **extra}, {})
    assert res.error and "no video" in res.text and cache.opens == 0


def test_context_without_a_readable_video(tools: Any, tmp_path: Path) -> None:
    clip, frame_at, _ = tools
    for ctx in ({}, {"video": None}, {"video": ""}):
        res = frame_at.run({"t_s": 1}, ctx)
        assert res.error and "has no video" in res.text
        assert clip.run({"start_s": 0, "end_s": 1}, ctx).error
    res = frame_at.run({"t_s": 1}, {"video": str(tmp_path / "gone.mp4")})
    assert res.error and "cannot be read" in res.text
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage" * 100)
    assert clip.run({"start_s": 0, "end_s": 1}, {"video": bad}).error
    with pytest.raises(TypeError):  # the trainer's context is the programmer's: wrong types raise
        frame_at.run({"t_s": 1}, {"video": 3})
    with pytest.raises(ValueError, match="frame_size"):
        frame_at.run({"t_s": 1}, {"video": "x.mp4", "frame_size": 0})


def test_reader_cache(tools: Any, event_video: dict[str, Any], tmp_path: Path) -> None:
    clip, frame_at, cache = tools
    ctx = {"video": event_video["path"]}
    for _ in range(3):
        clip.run({"start_s": 0, "end_s": 2}, ctx)
        frame_at.run({"t_s": 1}, ctx)
    assert (cache.opens, cache.hits, len(cache)) == (1, 5, 1)  # both tools share one reader
    others = [synthetic_event_video(tmp_path / f"o{k}.mp4", seed=k, duration_s=3, num_events=1) for k in range(2)]
    for info in others:
        frame_at.run({"t_s": 1}, {"video": info["path"]})
    assert cache.opens == 3 and len(cache) == 2  # maxsize 2: the first reader was dropped
    frame_at.run({"t_s": 1}, ctx)
    assert cache.opens == 4
    # a file rewritten in place is reopened (the key holds its mtime and size)
    synthetic_event_video(others[1]["path"], seed=9, duration_s=4, num_events=1)
    res = frame_at.run({"t_s": 1}, {"video": others[1]["path"]})
    assert cache.opens == 5 and "4.0 s long" in res.text


# ---------------------------------------------------------------------------------------------
# Synthetic questions: answerable from the right frames
# ---------------------------------------------------------------------------------------------


def _oracle(reader: VideoReader, row: dict[str, Any]) -> str:
    """Answer ``row`` from the pixels alone, as a model calling the tools could."""
    times = [reader.time_of(i) for i in range(reader.num_frames)]
    seen = [_colors_in(f) for f in reader.frames_at(times)]
    q = row["question"]
    if q.startswith("What colour"):
        t = float(re.search(r"about ([\d.]+) s", q).group(1))
        (answer,) = _colors_in(reader.frames_at([t])[0])
    elif q == "Which shape appears first?":
        first = next(s for s in seen if s)
        (mask,) = first.values()
        answer = _shape_of(mask)
    elif q.startswith("At what time"):
        color = re.search(r"does the (\w+) shape", q).group(1)
        t = next(t for t, s in zip(times, seen) if color in s)
        answer = next(o for o in row["options"] if float(o.split("-")[0]) <= t < float(o.split("-")[1].split()[0]))
    else:
        answer = str(len({c for s in seen for c in s}))
    return "ABCDEFGH"[row["options"].index(answer)]


def test_synthetic_questions_are_answerable_from_the_frames(tmp_path: Path) -> None:
    rows = synthetic_dataset(tmp_path, n=4, seed=11)
    assert {r["kind"] for r in rows} == {"colour_at", "first_shape", "when_colour", "count"}
    assert (tmp_path / "qa.jsonl").read_text().count("\n") == 4
    for row in rows:
        assert len(row["options"]) == 4 and row["answer"] in "ABCD"
        with VideoReader(tmp_path / row["video"]) as r:
            assert _oracle(r, row) == row["answer"], row
    # every kind of every video, not only the one written
    for seed in range(3):
        info = synthetic_event_video(tmp_path / f"q{seed}.mp4", seed=100 + seed, num_events=1 + seed)
        with VideoReader(info["path"]) as r:
            for q in info["questions"]:
                assert _oracle(r, q) == q["answer"], (seed, q)


def test_tools_are_safe_across_threads(event_video: dict[str, Any]) -> None:
    """The agent loop runs sync tools in threads (asyncio.to_thread): one shared reader, right frames."""
    from concurrent.futures import ThreadPoolExecutor

    cache = ReaderCache(maxsize=2)
    frame_at, clip = FrameAtTool(cache=cache), VideoClipTool(cache=cache)
    ctx = {"video": event_video["path"], "frame_size": 64, "clip_size": 64}
    ev = event_video["events"][1]
    mid = (ev["start_s"] + ev["end_s"]) / 2

    def job(k: int) -> str:
        if k % 2:
            clip.run({"start_s": 0, "end_s": 8, "num_frames": 8}, ctx)
        return _color_at(frame_at.run({"t_s": mid}, ctx).images[0], ev["position"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(job, range(32))) == [ev["color"]] * 32
    assert len(cache) == 1


def test_decord_and_pygame_png_loading_coexist(tmp_path):
    """decord's bundled libpng must not break pygame's PNG loading (gymnasium's Pendulum render)
    in the same process: a fresh interpreter reads a video with decord, then renders Pendulum."""
    import subprocess
    import sys

    code = (
        "import numpy as np, sys\n"
        "from mmpo_tasks.video_frames.video import VideoReader, write_video\n"
        f"p = write_video([np.zeros((32, 32, 3), np.uint8)] * 4, {str(tmp_path / 'v.mp4')!r}, 4)\n"
        "r = VideoReader(p, backend='decord'); r.frames_at([0.0])\n"
        "import gymnasium as gym\n"
        "e = gym.make('Pendulum-v1', render_mode='rgb_array'); e.reset(seed=0)\n"
        "print(e.render().shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(500, 500, 3)" in out.stdout
