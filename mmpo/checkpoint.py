"""Atomic checkpoints and the helpers for an exact resume.

Layout of a run folder::

    run_dir/checkpoints/step_00000012/COMPLETE      marker: the folder is whole
    run_dir/checkpoints/step_00000012/...           whatever the trainer saved (safetensors, JSON)
    run_dir/checkpoints/.tmp-step_00000014/          a save in progress (ignored, cleaned up)

A checkpoint is written into a temporary folder, fsynced, marked ``COMPLETE`` and renamed
into place, so a crash or an exception during a save never leaves a half-written
``step_*`` folder that :func:`latest_checkpoint` would pick. Nothing here unpickles: tensors
are safetensors, everything else JSON.

The marker records every file's relative path, size and sha256 (``{"step", "time", "files":
{path: {"size", "sha256"}}}``). A resume picks the newest checkpoint that still matches it
(:func:`usable_checkpoint`): a truncated, missing or altered file is reported and the previous
checkpoint tried. The final ``model/`` folder is written the same way (:func:`atomic_model_folder`)
with the checksums in ``model/MANIFEST.json``, which ``mmpo eval`` checks (:func:`verify_model_folder`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmpo import faults
from mmpo.errors import CheckpointError, DataError

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
#: the checksums of a final model folder (same ``files`` table as the ``COMPLETE`` marker)
MODEL_MANIFEST = "MANIFEST.json"
MODEL_DIR = "model"
_HASH_CHUNK = 1 << 20
_STEP_DIR = re.compile(r"step_(\d{8,})")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """``run_dir/checkpoints/step_00000012`` for step 12."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def temp_checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The folder a save of ``step`` writes into before it is renamed into place. The name is
    the same on every rank, so all ranks of a distributed save can write into it."""
    return Path(run_dir) / CHECKPOINTS_DIR / f".tmp-step_{step:08d}"


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint folder (``.../step_00000012`` -> 12). Raises ValueError."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like step_00000012)")
    return int(match.group(1))


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder whose save finished (it holds the marker)."""
    path = Path(path)
    return _STEP_DIR.fullmatch(path.name) is not None and (path / COMPLETE_MARKER).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None. Temporary and unmarked folders
    are ignored."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep_last: int, newest: int | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (``keep_last <= 0`` keeps
    all) and leftovers of interrupted saves (``.tmp-*``, ``.old-*``). With ``newest`` (the step
    just saved), checkpoints of later steps go too: they are the ones a resume found damaged and
    went back past, and must not count among the kept. Call it from one process while no save is
    running. Returns the deleted folders."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = list_checkpoints(run_dir)
    doomed = [p for p in found if newest is not None and checkpoint_step(p) > newest]
    found = [p for p in found if p not in doomed]
    doomed += found[:-keep_last] if keep_last > 0 else []
    doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".old-"))]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _fsync_path(path: Path) -> None:
    """fsync a file, or a folder's entry table (skipped where the OS does not allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


@contextlib.contextmanager
def atomic_checkpoint(
    run_dir: str | Path,
    step: int,
    enabled: bool = True,
    barrier: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder to write the checkpoint of ``step`` into; on a clean exit it is
    fsynced, marked ``COMPLETE`` and renamed to :func:`checkpoint_dir` (an existing checkpoint
    of the same step is replaced). On an exception the temporary folder is removed and the
    exception propagates: the run folder is as before.

    Distributed saves: every rank enters with the same ``step`` and gets the same folder; only
    the rank with ``enabled=True`` (the main one) creates, finalises and cleans it up. With
    ``barrier`` (e.g. ``dist.barrier``) the ranks wait for each other after the folder is
    created, before it is finalised (every rank has written) and after it is in place. A rank
    that raises inside the block skips the barriers, so the others will wait on it.
    """
    tmp = temp_checkpoint_dir(run_dir, step)
    final = checkpoint_dir(run_dir, step)
    _prepare_tmp(tmp, enabled, barrier)
    try:
        yield tmp
        faults.fault_point("checkpoint_write")  # test-only SIGKILL (MMPO_FAULT_AT); inert otherwise
        if barrier is not None:
            barrier()
        if enabled:
            _finalise(tmp, final, COMPLETE_MARKER, {"step": step, "time": time.time()})
    except BaseException:
        if enabled:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if barrier is not None:
        barrier()


@contextlib.contextmanager
def atomic_model_folder(
    run_dir: str | Path, enabled: bool = True, barrier: Callable[[], None] | None = None
) -> Iterator[Path]:
    """Yield ``run_dir/.tmp-model`` to write the final model into; on a clean exit its checksums
    go to ``MANIFEST.json`` inside it, it is fsynced and renamed to ``run_dir/model`` (replacing
    an old one), so ``model/`` is never half-written. ``enabled`` and ``barrier`` as in
    :func:`atomic_checkpoint` (the main rank writes; every rank gets the same path)."""
    tmp = Path(run_dir) / f".tmp-{MODEL_DIR}"
    _prepare_tmp(tmp, enabled, barrier)
    try:
        yield tmp
        if barrier is not None:
            barrier()
        if enabled:
            _finalise(tmp, Path(run_dir) / MODEL_DIR, MODEL_MANIFEST, {"time": time.time()})
            for old in Path(run_dir).glob(f".old-{MODEL_DIR}-*"):  # left by a save killed mid-swap
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if enabled:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if barrier is not None:
        barrier()


def save_model_atomically(
    run_dir: str | Path, save: Callable[[Path], None], enabled: bool = True, barrier: Callable[[], None] | None = None
) -> Path:
    """Call ``save(folder)`` (a trainer's ``save_final_model``, on every rank) inside
    :func:`atomic_model_folder`; returns ``run_dir/model``."""
    with atomic_model_folder(run_dir, enabled=enabled, barrier=barrier) as folder:
        save(folder)
    return Path(run_dir) / MODEL_DIR


def _prepare_tmp(tmp: Path, enabled: bool, barrier: Callable[[], None] | None) -> None:
    """Create an empty ``tmp`` (main rank), removing a leftover of an interrupted save; then wait for all ranks."""
    if enabled:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if barrier is not None:
        barrier()


def check_output_folder(out: str | Path, overwrite: bool) -> None:
    """Refuse an output folder that is a file, or that holds files without ``overwrite``
    (the data-prep CLIs' ``--out`` / ``--overwrite``)."""
    from mmpo.errors import ConfigError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"--out {out}: folder exists and is not empty; pass --overwrite (overwrite=True) to replace it"
        )


@contextlib.contextmanager
def atomic_folder(final: str | Path, *, before_replace: Callable[[], None] | None = None) -> Iterator[Path]:
    """Build a folder atomically: yields an empty sibling ``<name>.tmp-<pid>``; when the block
    ends without error it replaces ``final`` (an old ``final`` is moved to ``<name>.old-<pid>``
    first and then deleted), so readers see the old folder or the new one, never a partial one.
    On error the temporary folder is removed and ``final`` is untouched. ``before_replace`` runs
    just before the swap (e.g. to re-check that ``final`` may be overwritten)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if before_replace is not None:
            before_replace()
        old = None
        if final.exists():
            old = final.parent / f"{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finalise(tmp: Path, final: Path, marker_name: str, marker: dict[str, Any]) -> None:
    """Write ``marker`` plus the checksums of every file in ``tmp`` as ``tmp/marker_name``, flush
    the folder to disk and rename it to ``final``."""
    marker = {**marker, "files": folder_checksums(tmp)}
    (tmp / marker_name).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    _fsync_tree(tmp)
    old = None
    if final.exists():  # a folder cannot be renamed over a non-empty one: move it aside
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Checksums and verification
# ---------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_checksums(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"size": bytes, "sha256": hex}}`` of every file under ``folder``, sorted."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}


def verify_files(folder: str | Path, files: Any) -> list[str]:
    """What is wrong with ``folder`` against the checksum table ``files`` (as written by
    :func:`folder_checksums`): one ``"<path>: <what>"`` per missing, resized or altered file; []
    when all match. Files not in the table are not checked."""
    folder = Path(folder)
    if not isinstance(files, dict):
        return ["the checksum table is not a mapping"]
    problems = []
    for rel, entry in files.items():
        path = folder / rel
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel!r}: not a path inside the folder")
        elif not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or "sha256" not in entry:
            problems.append(f"{rel}: no size and sha256 recorded")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        elif (size := path.stat().st_size) != entry["size"]:
            what = "truncated" if size < entry["size"] else "grown"
            problems.append(f"{rel}: {what} ({size} bytes, {entry['size']} written)")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{rel}: content changed (sha256 differs from the one recorded at save)")
    return problems


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def verify_checkpoint(path: str | Path) -> list[str]:
    """What is wrong with a complete checkpoint folder (see :func:`verify_files`); [] when it is
    whole. A marker written before checksums were recorded (no ``files``) gets the structural
    check of :func:`_unverified_problems` only."""
    marker = _read_marker(Path(path) / COMPLETE_MARKER)
    if marker is None:
        return [f"{COMPLETE_MARKER}: unreadable (not the JSON marker mmpo writes)"]
    return verify_files(path, marker["files"]) if "files" in marker else _unverified_problems(Path(path))


def _unverified_problems(folder: Path) -> list[str]:
    """Damage visible without checksums: ``trainer_state.json`` missing, a JSON file that does not
    parse, a safetensors file shorter or longer than its header says. A changed byte goes unseen."""
    problems = [] if (folder / "trainer_state.json").is_file() else ["trainer_state.json: missing"]
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        rel = path.relative_to(folder).as_posix()
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n)) if 0 < n < path.stat().st_size else None
                ends = [int(v["data_offsets"][1]) for k, v in (header or {}).items() if k != "__metadata__"]
                if header is None or path.stat().st_size != 8 + n + max(ends, default=0):
                    problems.append(f"{rel}: truncated or padded (size does not match its header)")
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            problems.append(f"{rel}: unreadable")
    return problems


def _stderr(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)  # above a progress bar, not through it


def usable_checkpoint(run_dir: str | Path, report: bool = True) -> Path | None:
    """The newest complete checkpoint whose files match their checksums, or None when the run has
    none. Each damaged newer one is reported on stderr, one line naming the file and what is
    wrong (with ``report``; pass False off the main rank). A checkpoint from before checksums is
    used unverified, with a warning. Raises CheckpointError when checkpoints exist but none is usable."""
    found = list_checkpoints(run_dir)
    rejected: list[tuple[Path, list[str]]] = []
    for path in reversed(found):
        problems = verify_checkpoint(path)
        if problems:
            rejected.append((path, problems))
            continue
        for bad, why in rejected if report else []:
            more = f" (and {len(why) - 1} more)" if len(why) > 1 else ""
            _stderr(f"warning: checkpoint {bad} is damaged, {why[0]}{more}; resuming from {path.name} instead")
        if report and "files" not in (_read_marker(path / COMPLETE_MARKER) or {}):
            _stderr(f"warning: checkpoint {path} has no checksums (written by an older mmpo); loading it unverified")
        return path
    if not rejected:
        return None
    listed = "; ".join(f"{p.name}: {', '.join(why)}" for p, why in rejected)
    raise CheckpointError(
        f"no usable checkpoint in {Path(run_dir) / CHECKPOINTS_DIR}, every one is damaged: {listed}. "
        "The run cannot resume; move the damaged step_* folders away to start it over from step 0."
    )


def verify_model_folder(folder: str | Path) -> None:
    """Check a final model folder against its ``MANIFEST.json`` (nothing to check without one:
    folders from other tools or older runs). Raises CheckpointError naming the damaged file."""
    folder = Path(folder)
    if not (folder / MODEL_MANIFEST).is_file():
        return
    marker = _read_marker(folder / MODEL_MANIFEST)
    problems = verify_files(folder, marker.get("files")) if marker else [f"{MODEL_MANIFEST}: unreadable"]
    if problems:
        raise CheckpointError(
            f"model folder {folder} is damaged: {'; '.join(problems)} (checked against {MODEL_MANIFEST}). "
            "Retrain, or restore the folder from a copy."
        )


# ---------------------------------------------------------------------------------------------
# JSON and tensors
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` (plain JSON data) to ``path`` atomically (temp file + os.replace).
    Floats round-trip exactly; NaN/inf are written as JSON extensions (Python reads them)."""
    text = json.dumps(obj, indent=1, sort_keys=False) + "\n"
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_json(path: str | Path) -> Any:
    """Read a JSON file written by :func:`save_json`. Raises FileNotFoundError or DataError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def save_state_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save named tensors as one safetensors file, atomically. Tensors are moved to the CPU;
    entries that share memory are copied so safetensors accepts them."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    _atomic_write(Path(path), lambda tmp: save_file(out, str(tmp), metadata=metadata))


def load_state_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Named tensors from a safetensors file (no pickle involved)."""
    return load_file(str(path), device=str(device))


# ---------------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """States of python ``random``, numpy's global RNG, torch CPU and every CUDA device.

    Returns ``{"python": [version, [625 ints], gauss_next], "numpy": {...}, "torch": uint8
    tensor, "cuda": [uint8 tensor per device]}`` (``cuda`` is [] without CUDA).
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": {
            "kind": str(kind),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states returned by :func:`rng_state`. CUDA states are restored for as many
    devices as both the saved state and this machine have."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for device, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to(torch.uint8).cpu(), device)


def save_rng(path_dir: str | Path, name: str = "rng") -> None:
    """Write :func:`rng_state` as ``<name>.safetensors`` (torch byte states) and ``<name>.json``
    (python and numpy states) into ``path_dir``. Use a per-rank ``name`` in distributed runs."""
    state = rng_state()
    path_dir = Path(path_dir)
    tensors = {"torch": state["torch"]}
    tensors.update({f"cuda.{i}": s for i, s in enumerate(state["cuda"])})
    save_state_tensors(path_dir / f"{name}.safetensors", tensors)
    save_json(
        path_dir / f"{name}.json",
        {"python": state["python"], "numpy": state["numpy"], "num_cuda": len(state["cuda"])},
    )


def load_rng(path_dir: str | Path, name: str = "rng") -> None:
    """Restore the RNG states written by :func:`save_rng`."""
    path_dir = Path(path_dir)
    plain = load_json(path_dir / f"{name}.json")
    tensors = load_state_tensors(path_dir / f"{name}.safetensors")
    cuda = [tensors[f"cuda.{i}"] for i in range(int(plain.get("num_cuda", 0)))]
    set_rng_state({"python": plain["python"], "numpy": plain["numpy"], "torch": tensors["torch"], "cuda": cuda})
