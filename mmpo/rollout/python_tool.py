"""The ``python`` tool: model-written code run in a sandboxed subprocess (TAPO, arXiv 2510.07038;
RL-Factory, arXiv 2509.06980; see ``docs/plugins/tool_qa.md``).

The code is untrusted. Each call runs ``python -I`` (isolated mode: no ``PYTHON*`` variables, no
user site, no script folder on ``sys.path``) in a fresh temporary working folder, removed
afterwards, with an environment reduced to ``PATH``, ``HOME`` / ``TMPDIR`` (the folder) and
one-thread settings for numeric libraries. Layers, each a backstop for the others:

* **rlimits** set in the child before the code runs: ``RLIMIT_CPU`` (CPU seconds),
  ``RLIMIT_AS`` (address space), ``RLIMIT_NPROC`` (processes / threads of the user),
  ``RLIMIT_FSIZE`` (largest file written: stdout and stderr are files, so flooding them stops
  the program), ``RLIMIT_NOFILE`` and ``RLIMIT_CORE = 0``;
* **a wall-clock timeout**: the child leads its own process group (session), killed whole with
  ``SIGKILL`` when the time is up;
* **namespaces** when ``unshare --net --pid --fork --kill-child`` works here (root, or user
  namespaces allowed; probed once): a network namespace with no interface but a downed
  loopback, so no connection leaves the sandbox, and a PID namespace, so every process the code
  starts dies with the sandbox's first process;
* **privilege drop**: run as root, the child becomes ``nobody`` before the code runs (so
  ``RLIMIT_NPROC`` binds and root-owned files are read-only to it);
* **an audit hook** (PEP 578) installed before the code runs, which cannot be removed from
  Python: it refuses process creation (``os.fork``, ``os.system``, ``os.exec*``,
  ``os.posix_spawn``, ``subprocess.Popen``), signals (``os.kill``), ``ctypes`` and
  ``_posixsubprocess`` imports, and any write, rename, removal or mode change of a path outside
  the working folder. Without namespaces (``network="audit"``) it also refuses every ``socket.*``
  event and the import of ``socket`` / ``ssl``, which is how the network is blocked there.

:func:`run_python` never raises on bad code: a syntax error, an exception, a timeout, a memory
error or a killed process all come back as a :class:`SandboxResult` whose text the model reads.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from mmpo.errors import ConfigError
from mmpo.rollout.tools import TOOLS, Tool, ToolResult

#: how the network is cut: "auto" (namespaces when available, else the audit hook), "namespace", "audit"
NETWORK_MODES = ("auto", "namespace", "audit")
#: modules imported before the privilege drop (TAPO's restricted set and a few utilities): the
#: interpreter's files may be unreadable to ``nobody`` (e.g. a Python installed under /root)
PRELOAD = [
    "math",
    "cmath",
    "statistics",
    "random",
    "decimal",
    "fractions",
    "itertools",
    "functools",
    "collections",
    "datetime",
    "json",
    "re",
    "string",
    "heapq",
    "bisect",
    "operator",
]
_UNSHARE = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--"]

# Runs in the child before the model's code: rlimits, privilege drop, audit hook, then the code.
# argv[1]: JSON settings; argv[2]: the code. Kept free of imports that open sockets.
_BOOTSTRAP = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1]); code = sys.argv[2]; del sys.argv[1:]
sys.argv[0] = "<code>"
for name, (soft, hard) in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
for name in cfg["preload"]:
    try:
        __import__(name)
    except ImportError:
        pass
if cfg["uid"] is not None and os.geteuid() == 0:
    os.setgroups([]); os.setgid(cfg["gid"]); os.setuid(cfg["uid"])
def _make_hook(root, block_net, block_proc):
    realpath, fspath, sep = os.path.realpath, os.fspath, os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    deny = {"os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "sys.remote_exec"}
    if block_proc:
        deny |= {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
                 "pty.spawn", "os.startfile"}
    path_events = {"os.rename": 2, "os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.symlink": 2, "os.link": 2,
                   "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.utime": 1, "os.setxattr": 1,
                   "os.removexattr": 1, "shutil.rmtree": 1, "shutil.chown": 1}
    deny_imports = {"ctypes", "_ctypes", "_posixsubprocess"}
    if block_net:
        deny_imports |= {"socket", "_socket", "ssl", "_ssl"}
    busy = []
    def inside(p):
        if isinstance(p, int):
            return True  # an already-open descriptor
        try:
            p = realpath(fspath(p))
        except Exception:
            return False
        return p == root or p.startswith(root + sep)
    def hook(event, args):
        if busy:
            return
        busy.append(1)
        try:
            if event in deny or (block_net and event.startswith("socket.")):
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "import" and args and str(args[0]).split(".")[0] in deny_imports:
                raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
            if event == "open":
                path, mode, flags = args
                writes = (isinstance(flags, int) and flags & write_flags) or (
                    isinstance(mode, str) and any(c in mode for c in "wax+"))
                if writes and not inside(path):
                    raise PermissionError(f"sandbox: writing {path!r} outside the working folder is not allowed")
            n = path_events.get(event)
            if n:
                for p in args[:n]:
                    if p is not None and not inside(p):
                        raise PermissionError(f"sandbox: {event} on {p!r} outside the working folder is not allowed")
        finally:
            busy.pop()
    return hook
sys.addaudithook(_make_hook(os.path.realpath(os.getcwd()), cfg["block_net"], cfg["block_proc"]))
del _make_hook, cfg, json, resource
exec(compile(code, "<code>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class SandboxLimits:
    """Limits of one sandboxed run. ``timeout_s``: wall clock (TAPO: 2 s); ``cpu_s``: CPU
    seconds (default: the timeout, rounded up); ``memory_mb``: address space; ``max_processes``:
    ``RLIMIT_NPROC``; ``max_file_mb``: largest file written (stdout / stderr included);
    ``max_output_chars``: text kept of each stream (TAPO: 1024); ``network``: one of
    :data:`NETWORK_MODES`; ``block_processes``: refuse process creation in the audit hook
    (off only to test the rlimit and namespace backstops); ``drop_privileges``: run as ``nobody``
    when started as root (off only to test the other layers alone)."""

    timeout_s: float = 2.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: float = 1.0
    max_output_chars: int = 1024
    network: str = "auto"
    block_processes: bool = True
    drop_privileges: bool = True

    def check(self, where: str = "python_tool") -> None:
        """ConfigError naming the option when a limit is out of range."""
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"{where}.timeout_s must be a positive number of seconds; got {self.timeout_s!r}")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ConfigError(f"{where}.cpu_s must be >= 1; got {self.cpu_s!r}")
        if self.memory_mb < 64:
            raise ConfigError(f"{where}.memory_mb must be >= 64 (Python needs it to start); got {self.memory_mb!r}")
        if self.max_processes < 1:
            raise ConfigError(f"{where}.max_processes must be >= 1; got {self.max_processes!r}")
        if not self.max_file_mb > 0:
            raise ConfigError(f"{where}.max_file_mb must be > 0; got {self.max_file_mb!r}")
        if self.max_output_chars < 16:
            raise ConfigError(f"{where}.max_output_chars must be >= 16; got {self.max_output_chars!r}")
        if self.network not in NETWORK_MODES:
            raise ConfigError(f"{where}.network must be one of {list(NETWORK_MODES)}; got {self.network!r}")
        if self.network == "namespace" and not namespaces_available():
            raise ConfigError(
                f"{where}.network='namespace' but `unshare --net --pid` does not work here; use 'auto' or 'audit'"
            )


@dataclass
class SandboxResult:
    """What a run gave: ``stdout`` / ``stderr`` (each cut to ``max_output_chars``), the exit
    ``returncode`` (negative: killed by that signal), ``timed_out``, ``output_limited`` (a stream
    reached ``max_file_mb``), ``seconds`` (wall clock) and the ``network`` mode used."""

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    output_limited: bool
    seconds: float
    network: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def observation(self, max_chars: int = 1024) -> str:
        """The text shown to the model (TAPO: stdout, plus the end of stderr on error), at most
        ``max_chars`` characters: stdout is cut first, so the error lines stay."""
        parts: list[str] = []
        if self.timed_out:
            parts.append(f"error: timed out (wall-clock limit); the process was killed after {self.seconds:.1f} s")
        elif self.output_limited:
            parts.append("error: output limit exceeded; the process was stopped")
        elif self.returncode is not None and self.returncode < 0:
            name = signal.Signals(-self.returncode).name if -self.returncode in signal.valid_signals() else "signal"
            why = {
                "SIGXCPU": "CPU-time limit",
                "SIGKILL": "killed: CPU-time or memory limit",
                "SIGXFSZ": "file-size limit",
            }.get(name, name)
            parts.append(f"error: the process was stopped ({why})")
        if self.returncode not in (0, None) and self.stderr.strip():
            parts.append(self.stderr.strip().splitlines()[-1])
        tail = _cut("\n".join(parts), max_chars // 2) if parts else ""
        room = max_chars - len(tail) - (1 if tail else 0)
        text = "\n".join(p for p in (_cut(self.stdout.strip(), room), tail) if p)
        return text or "(no output)"


def _cut(text: str, n: int) -> str:
    """``text`` in at most ``n`` characters, marked when cut."""
    if len(text) <= n:
        return text
    return text[: n - 15] + "\n...[truncated]" if n > 30 else text[: max(n, 0)]


@functools.lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether ``unshare --net --pid --fork --kill-child`` runs here (probed once)."""
    if shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run([*_UNSHARE, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _nobody() -> tuple[int, int] | None:
    """``(uid, gid)`` of ``nobody`` when this process is root, else None (no privilege drop)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _read(f: Any, n: int, *, tail: bool = False) -> str:
    """At most ``n`` characters of the file: its start, or its end when ``tail``."""
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - 4 * n - 4) if tail else 0)
    text = f.read(4 * n + 4).decode("utf-8", errors="replace")
    if tail:
        return text if len(text) <= n and size <= 4 * n + 4 else "..." + text[-(n - 3) :]
    return _cut(text, n)


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` in the sandbox described in the module docstring; never raises on bad code
    (only an unusable ``limits`` raises ConfigError)."""
    lim = limits or SandboxLimits()
    lim.check()
    network = lim.network
    if network == "auto":
        network = "namespace" if namespaces_available() else "audit"
    ids = _nobody() if lim.drop_privileges else None
    workdir = tempfile.mkdtemp(prefix="mmpo-python-")
    if ids is not None:
        os.chown(workdir, *ids)
    cpu = lim.cpu_s if lim.cpu_s is not None else max(1, math.ceil(lim.timeout_s))
    fsize = int(lim.max_file_mb * 1024 * 1024)
    settings = {
        "rlimits": {
            "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU at the soft limit (a message), SIGKILL a second later
            "RLIMIT_AS": (lim.memory_mb * 1024 * 1024,) * 2,
            "RLIMIT_NPROC": (lim.max_processes,) * 2,
            "RLIMIT_FSIZE": (fsize,) * 2,
            "RLIMIT_NOFILE": (64, 64),
            "RLIMIT_CORE": (0, 0),
        },
        "uid": ids[0] if ids else None,
        "gid": ids[1] if ids else None,
        "block_net": network == "audit",
        "block_proc": lim.block_processes,
        "preload": PRELOAD,
    }
    cmd = [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(settings), code]
    if network == "namespace":
        cmd = _UNSHARE + cmd
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    start = time.monotonic()
    timed_out = False
    rc: int | None = None
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=workdir,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:  # e.g. the argument list is too long for the system
                return SandboxResult("", f"error: could not start python: {e}", None, False, False, 0.0, network)
            try:
                rc = proc.wait(timeout=lim.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                rc = proc.wait() if rc is None else rc
            seconds = time.monotonic() - start
            limited = max(os.fstat(out.fileno()).st_size, os.fstat(err.fileno()).st_size) >= fsize
            stdout, stderr = _read(out, lim.max_output_chars), _read(err, lim.max_output_chars, tail=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return SandboxResult(stdout, stderr, None if timed_out else rc, timed_out, limited, seconds, network)


def _kill_group(pgid: int) -> None:
    """SIGKILL the whole process group (what the code left running included)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class PythonTool(Tool):
    """``python(code)``: run Python and read what it prints. Arguments: ``code`` (a string of
    at most ``max_code_chars`` characters). The observation is the run's stdout, plus the last
    line of stderr on error, cut to ``limits.max_output_chars`` characters (TAPO's protocol);
    a failed run is an ``error`` result, never an exception."""

    name = "python"
    description = (
        "Run a Python 3 program and return what it prints (stdout). Use print() to see results. "
        "No network, no files outside a temporary folder, a few seconds of CPU."
    )

    def __init__(self, limits: SandboxLimits | None = None, *, max_code_chars: int = 8000) -> None:
        self.limits = limits or SandboxLimits()
        self.limits.check()
        if max_code_chars < 1:
            raise ConfigError(f"python_tool.max_code_chars must be >= 1; got {max_code_chars!r}")
        self.parameters = {
            "type": "object",
            "properties": {"code": {"type": "string", "minLength": 1, "maxLength": max_code_chars}},
            "required": ["code"],
            "additionalProperties": False,
        }

    def run(self, arguments: dict[str, Any], context: dict[str, Any]) -> ToolResult:
        code = arguments["code"]
        if "\x00" in code:  # argv cannot carry a NUL byte
            return ToolResult("error: the code holds a NUL character", error=True)
        res = run_python(code, self.limits)
        return ToolResult(res.observation(self.limits.max_output_chars), error=not res.ok)


TOOLS.register("python")(PythonTool)

__all__ = ["NETWORK_MODES", "PythonTool", "SandboxLimits", "SandboxResult", "namespaces_available", "run_python"]
