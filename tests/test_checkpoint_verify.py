"""Checkpoints that verify themselves (issue 18): the ``COMPLETE`` marker's checksums, a resume
that skips a damaged checkpoint for the previous one, a clear exit 2 when none is usable, and the
checksummed ``model/`` folder that ``mmpo eval`` checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from mmpo.checkpoint import (
    MODEL_MANIFEST,
    atomic_checkpoint,
    checkpoint_dir,
    file_sha256,
    prune_checkpoints,
    save_state_tensors,
    usable_checkpoint,
    verify_checkpoint,
    verify_model_folder,
)
from mmpo.cli import main
from mmpo.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
RUN = [
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=3",
    "eval.num_samples=4",
    "eval.batch_size=4",
    "trainer.eval_every=0",
    "trainer.eval_at_start=false",
    "task.num_train=64",
    "trainer.max_steps=4",
    "trainer.save_every=2",
    "trainer.keep_last=2",
]
STEP2, STEP4 = "step_00000002", "step_00000004"


def _save(run_dir: Path, step: int, files: dict[str, bytes]) -> Path:
    with atomic_checkpoint(run_dir, step) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
    return checkpoint_dir(run_dir, step)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- the marker and the selection, on hand-made folders --------------------------------------------


def test_marker_records_size_and_sha256_of_every_file(tmp_path: Path) -> None:
    folder = _save(tmp_path, 3, {"a.json": b"{}", "engine/w.bin": b"\x00" * 5000})
    marker = json.loads((folder / "COMPLETE").read_text())
    assert marker["step"] == 3
    assert marker["files"] == {
        "a.json": {"size": 2, "sha256": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},
        "engine/w.bin": {"size": 5000, "sha256": file_sha256(folder / "engine" / "w.bin")},
    }
    assert verify_checkpoint(folder) == []


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: _truncate_half(f / "engine" / "w.bin"), "engine/w.bin: truncated (2500 bytes, 5000 written)"),
        (lambda f: (f / "engine" / "w.bin").unlink(), "engine/w.bin: missing"),
        (lambda f: _flip_last_byte(f / "engine" / "w.bin"), "engine/w.bin: content changed"),
        (lambda f: (f / "COMPLETE").write_text("{not json"), "COMPLETE: unreadable"),
    ],
)
def test_damage_is_named_and_the_previous_checkpoint_chosen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Callable[[Path], None], expected: str
) -> None:
    older = _save(tmp_path, 2, {"engine/w.bin": b"\x01" * 5000})
    newer = _save(tmp_path, 4, {"engine/w.bin": b"\x02" * 5000})
    damage(newer)
    assert verify_checkpoint(newer)[0].startswith(expected)
    assert usable_checkpoint(tmp_path) == older
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert str(newer) in lines[0] and expected in lines[0] and f"resuming from {older.name}" in lines[0]


def test_no_usable_checkpoint_is_a_checkpoint_error_listing_each(tmp_path: Path) -> None:
    _truncate_half(_save(tmp_path, 2, {"w.bin": b"\x01" * 10}) / "w.bin")
    (_save(tmp_path, 4, {"w.bin": b"\x02" * 10}) / "w.bin").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000004: w.bin: missing; step_00000002: w.bin: truncated"):
        usable_checkpoint(tmp_path)
    assert usable_checkpoint(tmp_path / "fresh") is None


def _old_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint as mmpo wrote it before checksums: the marker holds step and time only."""
    folder = _save(run_dir, step, {"trainer_state.json": b'{"step": 2}'})
    save_state_tensors(folder / "engine" / "model.safetensors", {"w": torch.arange(100.0), "b": torch.ones(3)})
    (folder / "COMPLETE").write_text(json.dumps({"step": step, "time": 0.0}) + "\n")
    return folder


def test_old_marker_without_checksums_is_used_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _old_checkpoint(tmp_path, 2)
    assert verify_checkpoint(folder) == []
    assert usable_checkpoint(tmp_path) == folder
    assert "has no checksums (written by an older mmpo); loading it unverified" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: _truncate_half(f / "engine" / "model.safetensors"), "engine/model.safetensors: truncated or padded"),
        (lambda f: (f / "trainer_state.json").unlink(), "trainer_state.json: missing"),
        (lambda f: (f / "trainer_state.json").write_text('{"step": '), "trainer_state.json: unreadable"),
    ],
)
def test_old_marker_checkpoint_is_still_checked_for_truncation(
    tmp_path: Path, damage: Callable[[Path], None], expected: str
) -> None:
    damage(_old_checkpoint(tmp_path, 2))
    with pytest.raises(CheckpointError, match=f"step_00000002: {expected}"):
        usable_checkpoint(tmp_path)


def test_prune_drops_checkpoints_newer_than_the_one_just_saved(tmp_path: Path) -> None:
    """After a resume went back past a damaged step 4, saving step 3 with keep_last=1 keeps step 3."""
    for step in (2, 3, 4):
        _save(tmp_path, step, {"w.bin": bytes([step])})
    assert sorted(p.name for p in prune_checkpoints(tmp_path, keep_last=1, newest=3)) == [
        "step_00000002",
        "step_00000004",
    ]
    assert usable_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 3)


def test_model_manifest_catches_a_changed_file(tmp_path: Path) -> None:
    from mmpo.checkpoint import save_model_atomically

    def save(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"\x07" * 64)

    (tmp_path / ".old-model-999").mkdir()  # a save killed between its two renames
    model = save_model_atomically(tmp_path, save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    assert sorted(json.loads((model / MODEL_MANIFEST).read_text())["files"]) == ["config.json", "model.safetensors"]
    verify_model_folder(model)
    _flip_last_byte(model / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: content changed .*MANIFEST.json"):
        verify_model_folder(model)


# -- real runs: corrupt the newest checkpoint of a finished run, resume, compare with a straight run --


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("verify") / "straight"
    assert main(["train", QUICK, f"output_dir={run}", *RUN]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP2, STEP4]
    return run


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda c: _truncate_half(c / "engine" / "model.safetensors"), "engine/model.safetensors: truncated"),
        (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json: missing"),
        (lambda c: _flip_last_byte(c / "engine" / "model.safetensors"), "engine/model.safetensors: content changed"),
    ],
    ids=["truncated", "deleted", "flipped-byte"],
)
def test_resume_skips_a_damaged_checkpoint_and_ends_like_a_straight_run(
    straight: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[Path], None],
    expected: str,
) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "model")
    damage(run / "checkpoints" / STEP4)
    capsys.readouterr()
    assert main(["train", QUICK, f"output_dir={run}", *RUN]) == 0
    err = capsys.readouterr().err
    assert f"checkpoints/{STEP4} is damaged, {expected}" in err and f"resuming from {STEP2} instead" in err
    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # step 4 was saved again over the damaged one, and the final model carries its checksums
    assert verify_checkpoint(run / "checkpoints" / STEP4) == []
    manifest = json.loads((run / "model" / MODEL_MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == file_sha256(run / "model" / "model.safetensors")


@pytest.mark.slow
def test_every_checkpoint_damaged_exits_2_with_the_reason(
    straight: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    _flip_last_byte(run / "checkpoints" / STEP4 / "engine" / "model.safetensors")
    _truncate_half(run / "checkpoints" / STEP2 / "engine" / "optimizer.safetensors")
    capsys.readouterr()
    assert main(["train", QUICK, f"output_dir={run}", *RUN]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the message is wrapped at 100 columns
    assert "error: no usable checkpoint in" in err and "Traceback" not in err
    assert f"{STEP4}: engine/model.safetensors: content changed" in err
    assert f"{STEP2}: engine/optimizer.safetensors: truncated" in err


@pytest.mark.slow
def test_eval_refuses_a_model_folder_with_a_flipped_byte(
    straight: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    _flip_last_byte(run / "model" / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", QUICK, f"checkpoint={run}", *RUN]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is damaged: model.safetensors: content changed" in err and "Traceback" not in err
