"""Launch a script as several torchrun "nodes" on localhost, as separate machines would run it.

Each node is its own ``torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d`` launcher with
its own working directory (its "disk"); node 0's launcher hosts the rendezvous store
(``--rdzv-conf is_host=1``), the others connect to it. The c10d rendezvous, not the launch order,
decides which launcher becomes node (group) rank 0, as on real machines.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_command(nnodes: int, nproc: int, port: int, rdzv_id: str, host: bool, args: Sequence[object]) -> list[str]:
    """The torchrun command line of one node (``args`` starts with the script path)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={rdzv_id}",
        f"--rdzv-conf=is_host={int(host)}",
        *map(str, args),
    ]


def run_nodes(
    node_dirs: Sequence[Path],
    args: Sequence[object],
    nproc: int = 1,
    timeout: float = 300.0,
    retries: int = 1,
    env: dict[str, str] | None = None,
    done: Callable[[], bool] | None = None,
    check: bool = True,
) -> list[subprocess.CompletedProcess]:
    """Start one launcher per folder of ``node_dirs`` (its working directory), all at once; wait
    for all. A launch is good when every launcher exits 0 or ``done()`` says the results are on
    disk (DeepSpeed on CPU rarely aborts at exit); otherwise it is retried ``retries`` times with a
    new port and rendezvous id. Returns each node's result; raises AssertionError with the output
    tails when every attempt failed (``check=False``: returns the first attempt's results, failed
    or not, for a launch that is meant to fail)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    failures: list[str] = []
    for attempt in range(retries + 1):
        port, rdzv_id = free_port(), f"mmpo-test-{uuid.uuid4().hex[:8]}"
        procs = []
        for i, cwd in enumerate(node_dirs):
            Path(cwd).mkdir(parents=True, exist_ok=True)
            cmd = node_command(len(node_dirs), nproc, port, rdzv_id, i == 0, args)
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=cwd,
                    env=full_env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,  # its own process group, so a timeout ends its workers too
                )
            )
        deadline = time.monotonic() + timeout
        results, timed_out = [], False
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                timed_out = True
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
        if not check:
            return results
        if not timed_out and (all(r.returncode == 0 for r in results) or (done is not None and done())):
            return results
        tails = "\n".join(f"node {i}: exit {r.returncode}\n{r.stdout[-2000:]}" for i, r in enumerate(results))
        failures.append(f"attempt {attempt + 1}{' (timeout)' if timed_out else ''}:\n{tails}")
    raise AssertionError("multi-node torchrun failed:\n" + "\n\n".join(failures))
