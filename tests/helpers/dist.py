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
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", *map(str, args),
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    failures: list[str] = []
    for attempt in range(retries + 1):
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
