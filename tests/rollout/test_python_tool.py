"""The ``python`` tool's sandbox against hostile code: each attack fails safely, the caller goes
on, and the limits hold as measured facts (time taken, files not created, no process left)."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from mmpo.errors import ConfigError
from mmpo.rollout.python_tool import PythonTool, SandboxLimits, _nobody, namespaces_available, run_python
from mmpo.rollout.tools import parse_tool_calls

ROOT = Path(__file__).resolve().parents[2]
SLACK_S = 4.0  # python start-up and process teardown on a busy 2-core machine
MODES = ["audit", pytest.param("namespace", marks=pytest.mark.skipif(not namespaces_available(), reason="no unshare"))]


def _alive_with(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line holds ``marker``."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or []):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _no_leftovers(marker: str, wait_s: float = 3.0) -> bool:
    deadline = time.monotonic() + wait_s
    while _alive_with(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _still_works(mode: str) -> None:
    """The caller goes on: the next run computes normally."""
    r = run_python("print(4821 * 7393)", SandboxLimits(network=mode))
    assert r.ok and r.stdout.strip() == str(4821 * 7393)


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_is_killed_at_the_wall_clock_limit(mode: str) -> None:
    marker = f"loop-{uuid.uuid4().hex}"
    start = time.monotonic()
    r = run_python(f"# {marker}\nwhile True:\n    pass", SandboxLimits(timeout_s=1.0, cpu_s=30, network=mode))
    took = time.monotonic() - start
    assert r.timed_out and not r.ok and r.returncode is None
    assert 1.0 <= took < 1.0 + SLACK_S
    assert "timed out" in r.observation()
    assert _no_leftovers(marker)
    _still_works(mode)


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock() -> None:
    start = time.monotonic()
    r = run_python("while True:\n    pass", SandboxLimits(timeout_s=30.0, cpu_s=1, network="audit"))
    took = time.monotonic() - start
    assert not r.timed_out and r.returncode is not None and r.returncode < 0  # killed by SIGXCPU
    assert took < 1.0 + SLACK_S
    assert "CPU-time limit" in r.observation()


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_refused(mode: str) -> None:
    marker = f"bomb-{uuid.uuid4().hex}"
    start = time.monotonic()
    r = run_python(f"# {marker}\nimport os\nwhile True:\n    os.fork()", SandboxLimits(timeout_s=2.0, network=mode))
    assert time.monotonic() - start < 2.0 + SLACK_S
    assert not r.ok and "os.fork is not allowed" in r.observation()
    assert _no_leftovers(marker)
    _still_works(mode)


@pytest.mark.skipif(
    not namespaces_available() or (os.geteuid() == 0 and _nobody() is None),
    reason="needs a PID namespace and a user that RLIMIT_NPROC binds",
)
def test_fork_bomb_without_the_hook_is_bounded_and_leaves_nothing() -> None:
    """The backstops alone (RLIMIT_NPROC, the PID namespace, the group kill) contain a bomb."""
    marker = f"bomb2-{uuid.uuid4().hex}"
    code = f"# {marker}\nimport os, time\nfor _ in range(10000):\n    try:\n        os.fork()\n    except OSError:\n"
    code += "        time.sleep(0.05)\n"
    lim = SandboxLimits(timeout_s=1.0, max_processes=8, network="namespace", block_processes=False)
    start = time.monotonic()
    run_python(code, lim)
    assert time.monotonic() - start < 1.0 + SLACK_S
    assert _no_leftovers(marker)
    _still_works("namespace")


@pytest.mark.parametrize("code", ["x = bytearray(16 * 1024**3)", "x = [0] * (4 * 10**9)", "x = 'a' * (8 * 1024**3)"])
def test_huge_allocation_fails_with_a_memory_error(code: str) -> None:
    start = time.monotonic()
    r = run_python(code, SandboxLimits(memory_mb=256, network="audit"))
    assert time.monotonic() - start < 2.0 + SLACK_S and not r.timed_out
    assert not r.ok and "MemoryError" in r.observation()
    _still_works("audit")


@pytest.mark.parametrize("drop", [True, False], ids=["as-nobody", "hook-alone"])
@pytest.mark.parametrize("mode", MODES)
def test_writes_outside_the_working_folder_are_refused(mode: str, drop: bool, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    tag = uuid.uuid4().hex
    targets = [ROOT / f"sandbox_escape_{tag}", other / f"escape_{tag}", Path("/tmp") / f"escape_{tag}"]
    for target in targets:
        for code in (
            f"open({str(target)!r}, 'w').write('x')",
            f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
            f"import os\nopen('f', 'w').close()\nos.rename('f', {str(target)!r})",
            f"import os\nos.symlink('/etc/hostname', {str(target)!r})",
            f"import os\nos.mkdir({str(target)!r})",
        ):
            r = run_python(code, SandboxLimits(network=mode, drop_privileges=drop))
            assert not r.ok and "not allowed" in r.observation(), code
            assert not target.exists(), code
    keep = other / "keep.txt"
    keep.write_text("mine")
    r = run_python(f"import os\nos.remove({str(keep)!r})", SandboxLimits(network=mode, drop_privileges=drop))
    assert not r.ok and keep.read_text() == "mine"
    # inside its own folder the code may write; the folder is gone afterwards
    r = run_python("import os\nopen('a.txt', 'w').write('hi')\nprint(os.getcwd())\nprint(open('a.txt').read())")
    cwd, text = r.stdout.split()
    assert r.ok and text == "hi" and not Path(cwd).exists()
    _still_works(mode)


def _server() -> tuple[socket.socket, list[bytes]]:
    """A TCP listener on 127.0.0.1 that records what any client sends."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    got: list[bytes] = []

    def serve() -> None:
        while srv.fileno() != -1:
            try:
                conn, _ = srv.accept()
            except (socket.timeout, OSError):
                continue
            got.append(conn.recv(100) or b"<connected>")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, got


@pytest.mark.parametrize("drop", [True, False], ids=["as-nobody", "layer-alone"])
@pytest.mark.parametrize("mode", MODES)
def test_network_calls_fail(mode: str, drop: bool) -> None:
    """Either way: the namespace (no route: "Network is unreachable") or the audit hook (the
    socket refused) stops the call; ``layer-alone`` keeps root so that only that layer acts."""
    srv, got = _server()
    port = srv.getsockname()[1]
    try:
        # the listener works from here
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            c.sendall(b"parent")
        deadline = time.monotonic() + 2
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [b"parent"]
        for code in (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'child')",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
            "import socket\nsocket.getaddrinfo('example.com', 80)",
        ):
            r = run_python(code, SandboxLimits(network=mode, timeout_s=5.0, drop_privileges=drop))
            assert r.network == mode and not r.ok, (code, r)
            if not drop:
                why = "not allowed" if mode == "audit" else ("unreachable", "Temporary failure", "resolution")
                assert any(w in r.observation() for w in ([why] if isinstance(why, str) else why)), r
        time.sleep(0.3)
        assert got == [b"parent"]  # no connection from the sandbox reached the listener
    finally:
        srv.close()
    _still_works(mode)


@pytest.mark.parametrize("mode", MODES)
def test_output_flood_is_cut_and_stopped(mode: str) -> None:
    start = time.monotonic()
    r = run_python("while True:\n    print('x' * 10000)", SandboxLimits(timeout_s=10.0, max_file_mb=1.0, network=mode))
    assert time.monotonic() - start < 10.0 and not r.timed_out  # stopped by the file-size limit, not the clock
    assert r.output_limited and not r.ok
    obs = r.observation(1024)
    assert len(obs) <= 1024 and "output limit exceeded" in obs
    assert len(r.stdout) <= 1024
    _still_works(mode)


def test_environment_is_stripped_and_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMPO_SANDBOX_SECRET", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-evil")
    code = (
        "import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\nprint('/nonexistent-evil' in sys.path)"
    )
    r = run_python(code)
    keys, isolated, on_path = r.stdout.strip().splitlines()
    assert "MMPO_SANDBOX_SECRET" not in keys and "PYTHONPATH" not in keys
    assert isolated == "1" and on_path == "False"


def test_other_escapes_are_refused() -> None:
    for code, why in (
        ("import ctypes", "importing ctypes"),
        ("import subprocess\nsubprocess.run(['true'])", ""),
        ("import os\nos.system('true')", ""),
        ("import os\nos.kill(os.getppid(), 9)", "os.kill"),
    ):
        r = run_python(code, SandboxLimits(network="audit"))
        assert not r.ok and (why in r.observation()), code


def test_the_tool_never_raises_and_reports_errors() -> None:
    tool = PythonTool(SandboxLimits(timeout_s=2.0, max_output_chars=64))
    ok = tool.run({"code": "print(sum(range(101)))"}, {})
    assert ok.text == "5050" and not ok.error
    for code in ("def (", "raise ValueError('boom')", "import nonexistent_module_xyz", "print('a\x00b')"):
        res = tool.run({"code": code}, {})
        assert res.error and len(res.text) <= 64 and res.text
    assert "ValueError: boom" in tool.run({"code": "raise ValueError('boom')"}, {}).text
    # untrusted arguments are checked against the schema first
    calls = parse_tool_calls(
        '<tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call>', {"python": tool}
    )
    assert calls[0].arguments == {"code": "print(1)"}
    for bad in ('{"code": 1}', '{"code": ""}', '{"code": "x", "cwd": "/"}', "{}"):
        with pytest.raises(Exception, match="invalid arguments"):
            parse_tool_calls(f'<tool_call>{{"name": "python", "arguments": {bad}}}</tool_call>', {"python": tool})


@pytest.mark.parametrize(
    "limits, key",
    [
        (SandboxLimits(network="wifi"), "network"),
        (SandboxLimits(timeout_s=0.0), "timeout_s"),
        (SandboxLimits(memory_mb=8), "memory_mb"),
        (SandboxLimits(max_output_chars=2), "max_output_chars"),
        (SandboxLimits(cpu_s=0), "cpu_s"),
    ],
)
def test_bad_limits_raise_config_errors(limits: SandboxLimits, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        PythonTool(limits)
