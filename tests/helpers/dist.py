"""Launch a script under torchrun for tests, tolerant of DeepSpeed's rare abort at exit.

About 2 runs in 45 of DeepSpeed on CPU abort after finishing ("terminate called without an
active exception"): a run counts as good when its exit code is 0 or when ``done()`` says that
its results are complete on disk; otherwise it is retried ``retries`` times.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence


def run_torchrun(
    args: Sequence[str],
    nproc: int = 2,
    timeout: float = 300.0,
    retries: int = 1,
    env: dict[str, str] | None = None,
    done: Callable[[], bool] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node NPROC *args``; return the good attempt.

    ``args`` starts with the script path. ``env`` adds to the current environment (with
    OMP_NUM_THREADS=1 by default). Raises AssertionError with the output tail when every attempt
    failed (non-zero exit or timeout, and ``done()`` false or not given).
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *map(str, args),
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    failures: list[str] = []
    for attempt in range(retries + 1):
        proc = subprocess.Popen(
            cmd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, so a timeout ends the workers too
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            failures.append(f"attempt {attempt + 1}: timeout after {timeout} s\n{out[-3000:]}")
            continue
        result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
        if proc.returncode == 0 or (done is not None and done()):
            return result
        failures.append(f"attempt {attempt + 1}: exit code {proc.returncode}\n{out[-3000:]}")
    raise AssertionError("torchrun failed:\n" + "\n\n".join(failures))


def train_two_ranks_and_compare(
    out: Path, config: Path, overrides: list[str], env: dict[str, str] | None = None
) -> dict:
    """Train ``config`` on 2 processes with tests/helpers/train_and_dump.py, check that both ranks
    end with identical parameters, and return rank 0's ``{name: tensor}``."""
    import torch
    from safetensors.torch import load_file

    script = Path(__file__).resolve().parent / "train_and_dump.py"
    done = lambda: (out / "rank0.safetensors").exists() and (out / "rank1.safetensors").exists()  # noqa: E731
    run_torchrun([script, out, config, *overrides], nproc=2, timeout=400, retries=1, done=done, env=env)
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and len(r0) > 10
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    return r0
