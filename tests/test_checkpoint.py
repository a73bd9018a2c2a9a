"""mmpo.checkpoint: atomic saves, latest/prune, JSON and safetensors helpers, RNG round trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mmpo.checkpoint import (
    atomic_checkpoint,
    checkpoint_dir,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_json,
    load_rng,
    load_state_tensors,
    prune_checkpoints,
    rng_state,
    save_json,
    save_rng,
    save_state_tensors,
    set_rng_state,
    temp_checkpoint_dir,
)
from mmpo.errors import DataError


def _save(run_dir: Path, step: int, payload: str = "x") -> Path:
    with atomic_checkpoint(run_dir, step) as tmp:
        (tmp / "state.json").write_text(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"\x00\x01")
    return checkpoint_dir(run_dir, step)


def test_checkpoint_dir_and_step() -> None:
    path = checkpoint_dir(Path("runs/a"), 12)
    assert path == Path("runs/a/checkpoints/step_00000012")
    assert checkpoint_step(path) == 12
    assert checkpoint_step(checkpoint_dir("r", 123456789)) == 123456789
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        checkpoint_step("runs/a/checkpoints/.tmp-step_00000012")


def test_successful_save_is_complete_and_in_place(tmp_path: Path) -> None:
    final = _save(tmp_path, 5, "hello")
    assert (final / "state.json").read_text() == "hello"
    assert (final / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    assert json.loads((final / "COMPLETE").read_text())["step"] == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]


def test_exception_during_save_leaves_no_trace(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_checkpoint(tmp_path, 7) as tmp:
            (tmp / "half.bin").write_bytes(b"123")
            raise RuntimeError("disk on fire")
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert latest_checkpoint(tmp_path) is None


def test_failed_save_keeps_previous_checkpoints(tmp_path: Path) -> None:
    _save(tmp_path, 1, "first")
    with pytest.raises(KeyboardInterrupt):
        with atomic_checkpoint(tmp_path, 1) as tmp:  # a second save of the same step that dies
            (tmp / "state.json").write_text("second")
            raise KeyboardInterrupt
    assert (checkpoint_dir(tmp_path, 1) / "state.json").read_text() == "first"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    _save(tmp_path, 3, "old")
    (checkpoint_dir(tmp_path, 3) / "stale.txt").write_text("only in the old one")
    _save(tmp_path, 3, "new")
    final = checkpoint_dir(tmp_path, 3)
    assert (final / "state.json").read_text() == "new"
    assert not (final / "stale.txt").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]


def test_latest_picks_newest_complete(tmp_path: Path) -> None:
    for step in (2, 10, 9):
        _save(tmp_path, step)
    (checkpoint_dir(tmp_path, 12)).mkdir()  # half-written: no COMPLETE marker
    temp_checkpoint_dir(tmp_path, 15).mkdir()  # an interrupted save
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [2, 9, 10]
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_prune_keeps_last_k(tmp_path: Path) -> None:
    for step in range(1, 6):
        _save(tmp_path, step)
    temp_checkpoint_dir(tmp_path, 6).mkdir()  # leftover of an interrupted save
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == [".tmp-step_00000006"] + [f"step_0000000{s}" for s in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]
    assert prune_checkpoints(tmp_path, keep_last=0) == []  # 0 keeps all
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [4, 5]


def test_non_main_rank_writes_into_the_shared_temp_folder(tmp_path: Path) -> None:
    calls: list[str] = []
    with atomic_checkpoint(tmp_path, 4, barrier=lambda: calls.append("main")) as main_tmp:
        with atomic_checkpoint(tmp_path, 4, enabled=False, barrier=lambda: calls.append("other")) as other_tmp:
            assert other_tmp == main_tmp
            (other_tmp / "rank1.bin").write_bytes(b"r1")
        assert main_tmp.is_dir()  # the non-main rank neither renamed nor removed it
        (main_tmp / "rank0.bin").write_bytes(b"r0")
    assert sorted(p.name for p in checkpoint_dir(tmp_path, 4).iterdir()) == ["COMPLETE", "rank0.bin", "rank1.bin"]
    # each rank waits after creation, before finalising and after the rename
    assert calls == ["main", "other", "other", "other", "main", "main"]


def test_barrier_is_called_around_the_rename(tmp_path: Path) -> None:
    seen: list[tuple[bool, bool]] = []

    def barrier() -> None:
        seen.append((temp_checkpoint_dir(tmp_path, 2).exists(), checkpoint_dir(tmp_path, 2).exists()))

    with atomic_checkpoint(tmp_path, 2, barrier=barrier) as folder:
        (folder / "x").write_text("1")
    # (temp exists, final exists): created; written but not yet renamed; in place
    assert seen == [(True, False), (True, False), (False, True)]


def test_json_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    obj = {"beta": 0.1 + 0.2, "hist": [1, 2.5e-300, -3], "nested": {"k": None, "b": True}}
    path = tmp_path / "deep" / "state.json"
    save_json(path, obj)
    assert load_json(path) == obj
    with pytest.raises(TypeError):
        save_json(path, {"bad": object()})
    assert load_json(path) == obj  # a failed write leaves the old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
    path.write_text('{"a": ')
    with pytest.raises(DataError, match="state.json: invalid JSON at line 1"):
        load_json(path)


def test_state_tensors_round_trip(tmp_path: Path) -> None:
    base = torch.arange(6, dtype=torch.float32)
    tensors = {"a": base, "view": base[2:4], "t": torch.ones(2, 3).t(), "i": torch.tensor([1, 2], dtype=torch.int64)}
    save_state_tensors(tmp_path / "s.safetensors", tensors)
    loaded = load_state_tensors(tmp_path / "s.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


def _draws() -> tuple[float, float, float, list[float], list[float]]:
    # gauss/randn first: they consume the cached second gaussian held in the RNG states
    py = (random.gauss(0, 1), random.random())
    return *py, float(np.random.randn()), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_round_trip_through_files(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()  # leaves numpy's has_gauss state
    save_rng(tmp_path)
    expected = _draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draws() != expected
    load_rng(tmp_path)
    assert _draws() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rng.json", "rng.safetensors"]
    json.loads((tmp_path / "rng.json").read_text())  # plain JSON, no pickle


def test_rng_round_trip_in_memory_and_named_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = rng_state()
    expected = _draws()
    _draws()
    set_rng_state(state)
    assert _draws() == expected
    save_rng(tmp_path, name="rng_rank1")
    expected = _draws()
    load_rng(tmp_path, name="rng_rank1")
    assert _draws() == expected
