"""vLLM rollout engine (``rollout.engine: vllm``): samples with vLLM from its own copy of the weights.

Two modes (``rollout.engine_options.mode``):

- ``server`` (default): vLLM runs in its own environment (``make vllm-env`` builds ``.venv-vllm``;
  vLLM pins torch / transformers versions the trainer does not use) as an OpenAI-compatible
  server on 127.0.0.1, started at the first rollout from the policy's current weights. Prompts
  go over HTTP as token ids (standard library only); after each optimizer update
  ``sync_weights`` writes the weights as safetensors (under /dev/shm when it has room) and the
  server reloads them in place (dev-mode ``/collective_rpc reload_weights``) without a restart.
  The server refuses strangers: each start draws a random API key (passed in the server's
  environment, never on its command line, in a log or in the run folder) and every route, the
  dev-mode ones included, answers 401 without it (vLLM's own ``--api-key`` check covers only
  ``/v1``-style paths, so a small ASGI middleware, :data:`GUARD_SOURCE`, guards the rest).
  ``extra_args`` cannot move the server off 127.0.0.1 or replace the key.
- ``colocate``: ``vllm.LLM`` in the trainer's own process (needs ``import vllm`` to work in the
  trainer's interpreter, i.e. a GPU install); the same folder route reloads the weights.

Sampling matches the trainer's log-probs: vLLM reports *processed* log-probs
(``log_softmax(logits / temperature)``; with top_p / top_k also the truncation), never-sampled
ids get a -100 logit bias (the most vLLM allows; their probability is then ~e^-100, so the
normalisation matches the trainer's -inf mask), generation defaults from the model folder are
ignored (``--generation-config vllm``: no hidden repetition penalty or top_k) and every EOS id
stops a completion. This is the only module of mmpo that imports vllm, and only in colocate mode.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmpo.errors import ConfigError
from mmpo.policies.batching import completion_mask_from_ids
from mmpo.rollout.engines.base import ROLLOUT_ENGINES, Generation, GenerationSettings, RolloutEngine

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"
SERVED_NAME = "policy"
NEVER_SAMPLE_BIAS = -100.0  # vLLM clamps logit_bias to [-100, 100]
_MEDIA_KEYS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")
KEY_ENV = "VLLM_API_KEY"  # the server reads its key from here (vLLM's own check + the guard below)
GUARD_MODULE = "mmpo_vllm_guard"
#: server flags ``extra_args`` may not set (nor abbreviate): where the server listens and its key;
#: ``--config`` could carry any of them inside a file.
RESERVED_FLAGS = ("--host", "--port", "--api-key", "--uds", "--grpc-port", "--config")
#: ASGI middleware run inside the vLLM server (``--middleware``): every HTTP / websocket request,
#: on any path, needs ``Authorization: Bearer <key>``; without a key configured nothing is served.
GUARD_SOURCE = """\
import hashlib
import hmac
import os


class RequireKey:
    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    def _authorized(self, scope):
        if self.digest is None:
            return False
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self.digest)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not self._authorized(scope):
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "http" and not self._authorized(scope):
            body = b'{"error": "Unauthorized"}'
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
"""

#: engine_options keys and their defaults (None: not passed on / chosen at start).
OPTIONS: dict[str, Any] = {
    "mode": "server",  # 'server' (vLLM in its own env, over HTTP) or 'colocate' (vllm.LLM in-process)
    "python": None,  # server: the vLLM env's interpreter ($MMPO_VLLM_PYTHON, else .venv-vllm/bin/python)
    "dtype": None,  # vLLM --dtype; None: float32 on CPU, auto on GPU
    "max_model_len": 4096,  # prompt + completion tokens per sequence
    "kv_cache_gib": 1,  # CPU: VLLM_CPU_KVCACHE_SPACE (GiB)
    "gpu_memory_utilization": None,  # GPU share vLLM may take (colocate default 0.3; server: vLLM's)
    "enforce_eager": True,  # no CUDA graphs / torch.compile: fast start
    "port": 0,  # server port on 127.0.0.1; 0 = a free one
    "startup_timeout_s": 600.0,
    "request_timeout_s": 600.0,
    "max_concurrency": 32,  # concurrent HTTP requests (one per prompt group)
    "seed": True,  # seed requests from torch's RNG: reproducible runs (vllm-cpu: ~2x slower sampling)
    "batch_requests": False,  # with seed false: one request for all prompts instead of one per prompt
    "weights_dir": None,  # where weight folders are written; None: /dev/shm when it has room
    "log_file": None,  # server log; None: server.log in the engine's temp folder (removed at close)
    "extra_args": [],  # more vLLM server / LLM arguments (server: CLI strings; colocate: a dict)
    "env": {},  # extra environment variables for the server
}


def _option_error(key: str, why: str) -> ConfigError:
    return ConfigError(f"rollout.engine_options.{key}: {why}")


def check_extra_args(opts: dict[str, Any]) -> None:
    """Server mode: ``extra_args`` must be CLI strings that leave host, port and key alone (ConfigError).

    vLLM's parser takes ``_`` for ``-``, ``--flag=value`` and unambiguous prefixes (argparse
    ``allow_abbrev``), so each of those spellings of a :data:`RESERVED_FLAGS` flag is refused."""
    extra = opts.get("extra_args") or []
    if not isinstance(extra, (list, tuple)):
        raise _option_error("extra_args", f"server mode takes a list of CLI strings, got {extra!r}")
    for arg in extra:
        if not isinstance(arg, (str, int, float)) or isinstance(arg, bool):
            raise _option_error("extra_args", f"server mode takes a list of CLI strings, got the item {arg!r}")
        flag = str(arg).split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        norm = "--" + flag[2:].replace("_", "-")
        for reserved in RESERVED_FLAGS:
            if len(norm) > 3 and reserved.startswith(norm):
                raise _option_error(
                    "extra_args",
                    f"{flag!r} would set the server's {reserved} (vLLM reads {flag!r} as {reserved}); mmpo "
                    f"starts the server on 127.0.0.1 with a port (engine_options.port) and a random per-run "
                    f"API key of its own, and extra_args cannot change them",
                )
    env = opts.get("env") or {}
    if not isinstance(env, dict):
        raise _option_error("env", f"must be a mapping of variable name to value, got {env!r}")
    if KEY_ENV in env:
        raise _option_error(f"env.{KEY_ENV}", "the server's API key is drawn by mmpo for each run and cannot be set")


def _resolve_python(value: Any) -> Path:
    """The vLLM environment's interpreter: option, $MMPO_VLLM_PYTHON, or .venv-vllm/bin/python."""
    if value:
        path, origin = Path(str(value)).expanduser(), "rollout.engine_options.python"
    elif os.environ.get("MMPO_VLLM_PYTHON"):
        path, origin = Path(os.environ["MMPO_VLLM_PYTHON"]).expanduser(), "$MMPO_VLLM_PYTHON"
    else:
        path, origin = DEFAULT_VENV / "bin" / "python", "the default"
    if not path.exists():
        raise ConfigError(
            f"rollout.engine=vllm: no vLLM interpreter at '{path}' ({origin}). Build the vLLM "
            f"environment with `make vllm-env` (creates .venv-vllm), or point "
            f"rollout.engine_options.python (or $MMPO_VLLM_PYTHON) at the python of an "
            f"environment where `import vllm` works."
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path | None, n: int = 40) -> str:
    if path is None or not path.exists():
        return "(no server log)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


# ---------------------------------------------------------------------------------- weights
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face / PEFT model inside a wrapper such as a DeepSpeed engine (``.module``)."""
    while not hasattr(model, "save_pretrained") and hasattr(model, "module"):
        model = model.module
    return model


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain Hugging Face tensor names and values of ``model``'s current weights.

    A PEFT LoRA model gives its base weights with every active adapter's delta added (as
    ``merge_and_unload`` would) without touching the training model; a ``modules_to_save`` copy
    replaces the original module.
    """
    if not hasattr(model, "get_base_model"):
        return dict(model.state_dict())
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    lora_modules = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in base.state_dict().items():
            if ".lora_" in key or ".original_module." in key:
                continue
            if ".base_layer." in key:
                owner, _, leaf = key.partition(".base_layer.")
                layer = lora_modules.get(owner)
                if leaf == "weight" and layer is not None and not getattr(layer, "merged", False):
                    value = value.clone()
                    for name in layer.active_adapters:
                        if name in getattr(layer, "lora_A", {}) or name in getattr(layer, "lora_embedding_A", {}):
                            value += layer.get_delta_weight(name).to(value.dtype)
                key = f"{owner}.{leaf}"
            key = key.replace(".modules_to_save.default.", ".")
            out[key] = value
    return out


def write_weights(model: torch.nn.Module, folder: Path, processor: Any = None) -> Path:
    """``save_pretrained`` of ``model``'s current (merged) weights into ``folder`` (+ processor)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    model = _unwrap(model)
    if hasattr(model, "get_base_model"):
        target, state = model.get_base_model(), merged_state_dict(model)
    else:
        target, state = model, None
    from mmpo.models import quiet_hf_progress

    with quiet_hf_progress():
        target.save_pretrained(folder, state_dict=state, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


def _weights_root(option: Any, model: torch.nn.Module) -> str | None:
    """Parent of the engine's temp folder: the option, /dev/shm when it has room, else the default."""
    if option:
        return str(option)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        if shutil.disk_usage(shm).free > 3 * size + (256 << 20):
            return str(shm)
    return None


# ---------------------------------------------------------------------------------- engine
_Group = tuple[list[int], int, "int | None"]  # prompt token ids, samples, seed of the first sample


@dataclass
class _Sample:
    token_ids: list[int]
    logprobs: list[float]


@ROLLOUT_ENGINES.register("vllm")
class VLLMEngine(RolloutEngine):
    """vLLM sampling from a weight copy that ``sync_weights`` refreshes (see the module docstring).

    The server (or in-process LLM) starts at the first ``generate`` from the weights of the
    model passed there, so a run resumed from a checkpoint samples from the restored weights.
    """

    holds_weights = True
    OPTIONS: ClassVar[dict[str, Any]] = OPTIONS

    @classmethod
    def check_environment(cls, options: dict[str, Any]) -> None:
        """Server mode: the vLLM environment's interpreter must exist (``make vllm-env``)."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise _option_error(unknown[0], f"unknown option. Valid options: {', '.join(OPTIONS)}.")
        opts = {**OPTIONS, **options}
        if opts["mode"] == "server":
            check_extra_args(opts)
            _resolve_python(opts["python"])

    def __init__(self, policy: Any, options: dict[str, Any] | None = None) -> None:
        super().__init__(policy, options)
        unknown = sorted(set(self.options) - set(OPTIONS))
        if unknown:
            raise _option_error(unknown[0], f"unknown option. Valid options: {', '.join(OPTIONS)}.")
        self.opts = {**OPTIONS, **self.options}
        self.mode = self.opts["mode"]
        if self.mode not in ("server", "colocate"):
            raise _option_error("mode", f"must be 'server' or 'colocate', got {self.mode!r}")
        if self.mode == "server":
            check_extra_args(self.opts)
            self.python = _resolve_python(self.opts["python"])
        else:
            try:
                import vllm  # noqa: F401
            except Exception as e:  # ImportError, or a broken install (CUDA libraries missing)
                raise ConfigError(
                    f"rollout.engine_options.mode=colocate runs vllm.LLM inside the trainer, but "
                    f"`import vllm` fails in this interpreter ({sys.executable}): {e}. Install vLLM "
                    f"into the trainer's environment (GPU), or use mode: server with the separate "
                    f"environment from `make vllm-env`."
                ) from None
        if self.opts["dtype"] is None:
            self.opts["dtype"] = "auto" if torch.cuda.is_available() else "float32"
        self._proc: subprocess.Popen | None = None
        self._llm: Any = None
        self._tmp: Path | None = None
        self._log_path: Path | None = None
        self.base_url = ""
        self._api_key = ""  # drawn at each server start; kept in memory only
        self.startup_s: float | None = None
        self.last_sync_s: float | None = None
        self.syncs = 0
        self._closed = False
        self._lock = threading.Lock()
        atexit.register(self.close)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._proc is not None or self._llm is not None

    @property
    def server_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, model: torch.nn.Module) -> None:
        """Write ``model``'s weights and start vLLM on them (no-op once started)."""
        if self.started:
            return
        if self._closed:
            raise RuntimeError("the vLLM engine was closed")
        t0 = time.perf_counter()
        self._tmp = Path(tempfile.mkdtemp(prefix="mmpo-vllm-", dir=_weights_root(self.opts["weights_dir"], model)))
        model_dir = write_weights(model, self._tmp / "model", self.policy.processor)
        if self.mode == "server":
            self._start_server(model_dir)
        else:
            self._start_llm(model_dir)
        self.startup_s = time.perf_counter() - t0
        log.info("vLLM (%s) ready in %.1f s", self.mode, self.startup_s)

    def _server_command(self, model_dir: Path, port: int) -> list[str]:
        """The server's command line: tunable defaults, then ``extra_args``, then the flags mmpo
        relies on (argparse keeps the last value, so those cannot be overridden). The API key is
        not on it (a command line is visible to every local user): it goes in the environment."""
        o = self.opts
        extra = [str(a) for a in o["extra_args"] or []]
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server"]
        cmd += ["--dtype", str(o["dtype"]), "--max-model-len", str(int(o["max_model_len"]))]
        cmd.append("--disable-uvicorn-access-log")
        if o["enforce_eager"]:
            cmd.append("--enforce-eager")
        if o["seed"] and not torch.cuda.is_available() and not any("chunked-prefill" in a for a in extra):
            # vllm-cpu crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split into chunks: schedule whole prompts only
            cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(int(o["max_model_len"]), 4096))]
        if o["gpu_memory_utilization"] is not None:
            cmd += ["--gpu-memory-utilization", str(o["gpu_memory_utilization"])]
        return (
            cmd
            + extra
            + [
                "--model",
                str(model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--served-model-name",
                SERVED_NAME,
                "--logprobs-mode",
                "processed_logprobs",
                "--generation-config",
                "vllm",
                "--middleware",
                f"{GUARD_MODULE}.RequireKey",
            ]
        )

    def _start_server(self, model_dir: Path) -> None:
        assert self._tmp is not None
        port = int(self.opts["port"]) or _free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self._log_path = Path(self.opts["log_file"]) if self.opts["log_file"] else self._tmp / "server.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            VLLM_SERVER_DEV_MODE="1",
            VLLM_CPU_KVCACHE_SPACE=str(int(self.opts["kv_cache_gib"])),
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        env.pop("PYTHONPATH", None)  # the trainer's path must not shadow the vLLM env's packages
        env.update({str(k): str(v) for k, v in (self.opts["env"] or {}).items()})
        guard_dir = self._tmp / "guard"  # inside the 0700 temp folder: no one else can swap the module
        guard_dir.mkdir(exist_ok=True)
        (guard_dir / f"{GUARD_MODULE}.py").write_text(GUARD_SOURCE)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(guard_dir), env.get("PYTHONPATH")) if p)
        self._api_key = secrets.token_urlsafe(32)
        env[KEY_ENV] = self._api_key
        cmd = self._server_command(model_dir, port)
        with open(self._log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(self._tmp),
                start_new_session=True,  # own process group: close() ends it all
            )
        deadline = time.monotonic() + float(self.opts["startup_timeout_s"])
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(
                    f"the vLLM server exited with code {code} while starting. Command: {' '.join(cmd)}\n"
                    f"Last lines of its log ({self._log_path}):\n{_tail(self._log_path)}"
                )
            try:
                health = urllib.request.Request(self.base_url + "/health", headers=self._auth())
                with urllib.request.urlopen(health, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                tail = _tail(self._log_path)
                self._stop_server()
                raise RuntimeError(
                    f"the vLLM server was not healthy within {self.opts['startup_timeout_s']} s "
                    f"(rollout.engine_options.startup_timeout_s). Last lines of its log:\n{tail}"
                )
            time.sleep(0.5)

    def _start_llm(self, model_dir: Path) -> None:
        from vllm import LLM

        o = self.opts
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            dtype=o["dtype"],
            max_model_len=int(o["max_model_len"]),
            enforce_eager=bool(o["enforce_eager"]),
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            gpu_memory_utilization=float(o["gpu_memory_utilization"] or 0.3),
        )
        if o["seed"] and not torch.cuda.is_available():  # see _server_command
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(int(o["max_model_len"]), 4096))
        extra = o["extra_args"] or {}
        if not isinstance(extra, dict):
            raise _option_error("extra_args", f"colocate mode takes a dict of vllm.LLM arguments, got {extra!r}")
        kwargs.update(extra)
        self._llm = LLM(**kwargs)

    def close(self) -> None:
        """Stop the server (its whole process group) / drop the LLM and remove the temp folder."""
        if self._closed:
            return
        self._closed = True
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001  (interpreter shutting down)
            pass
        self._stop_server()
        if self._llm is not None:
            llm, self._llm = self._llm, None
            try:  # stops the engine-core process now rather than at garbage collection
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # noqa: BLE001
                log.warning("vLLM engine shutdown: %s", e)
            del llm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _stop_server(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the server leads its own process group
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            # the API server is gone; wait for its engine-core children to leave the group
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.1)
            if not _group_alive(pgid):
                break
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    # -- HTTP --------------------------------------------------------------------------------
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"}

    def _post(self, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        req = urllib.request.Request(
            self.base_url + path, data=data, method="POST", headers={"Content-Type": "application/json", **self._auth()}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout or float(self.opts["request_timeout_s"])) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            tail = f"\nLast lines of its log:\n{_tail(self._log_path)}" if e.code >= 500 else ""
            raise RuntimeError(f"vLLM server: POST {path} failed with HTTP {e.code}: {detail}{tail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            alive = self._proc is not None and self._proc.poll() is None
            state = "running" if alive else "exited"
            raise RuntimeError(
                f"vLLM server: POST {path} failed ({e}); the server has {state}. Last lines of its "
                f"log:\n{_tail(self._log_path)}"
            ) from None
        return json.loads(raw) if raw.strip() else None

    # -- sampling ----------------------------------------------------------------------------
    def _sampling(self, settings: GenerationSettings) -> dict[str, Any]:
        pol = self.policy
        if settings.greedy:
            temperature, top_p, top_k = 0.0, 1.0, 0
        else:
            temperature, top_p, top_k = settings.temperature, settings.top_p, settings.top_k
        return dict(
            max_tokens=int(settings.max_new_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k) if top_k and top_k > 0 else 0,
            stop_token_ids=list(pol.eos_token_ids),
            logit_bias={int(i): NEVER_SAMPLE_BIAS for i in pol.never_sample_ids},
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            min_p=0.0,
            min_tokens=int(settings.min_new_tokens),
            ignore_eos=False,
            skip_special_tokens=False,
            logprobs=0,
        )

    def _complete_server(self, groups: list[_Group], params: dict[str, Any]) -> list[list[_Sample]]:
        base = {k: v for k, v in params.items() if k != "logit_bias"}
        base.update(
            model=SERVED_NAME,
            logit_bias={str(k): v for k, v in params["logit_bias"].items()} or None,
            return_token_ids=True,
            return_tokens_as_token_ids=True,
        )

        def parse(choice: dict[str, Any]) -> _Sample:
            ids = [int(t) for t in choice.get("token_ids") or []]
            lps = (choice.get("logprobs") or {}).get("token_logprobs") or [0.0] * len(ids)
            return _Sample(ids, [float(x) if x is not None else 0.0 for x in lps])

        if self.opts["batch_requests"] and not self.opts["seed"] and len({n for _, n, _ in groups}) == 1:
            n = groups[0][1]  # (a request has one seed: seeded prompts go one request each)
            body = dict(base, prompt=[g[0] for g in groups], n=n)
            choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
            return [[parse(c) for c in choices[i * n : (i + 1) * n]] for i in range(len(groups))]

        def one(group: _Group) -> list[_Sample]:
            tokens, n, seed = group
            out = self._post("/v1/completions", dict(base, prompt=tokens, n=n, seed=seed))
            return [parse(c) for c in sorted(out["choices"], key=lambda c: c["index"])]

        workers = max(1, min(len(groups), int(self.opts["max_concurrency"])))
        if workers == 1:
            return [one(g) for g in groups]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, groups))

    def _complete_llm(self, groups: list[_Group], params: dict[str, Any]) -> list[list[_Sample]]:
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": tokens} for tokens, _, _ in groups]
        sps = [
            SamplingParams(n=n, seed=seed, **{**params, "logit_bias": params["logit_bias"] or None})
            for _, n, seed in groups
        ]
        outs = self._llm.generate(prompts, sps, use_tqdm=False)
        result = []
        for out in outs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = [int(t) for t in c.token_ids]
                lps = [float(d[t].logprob) if d and t in d else 0.0 for t, d in zip(ids, c.logprobs or [{}] * len(ids))]
                samples.append(_Sample(ids, lps))
            result.append(samples)
        return result

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        prompt_inputs: dict[str, torch.Tensor],
        settings: GenerationSettings,
        *,
        device: torch.device,
        dtype: torch.dtype | None = None,
        num_samples: int = 1,
    ) -> Generation:
        """``num_samples`` completions of each of the ``k`` left-padded prompts ``prompt_inputs
        [k, P]``; rows prompt-major (``n = k * num_samples``). Each prompt (and a run of equal
        consecutive prompts) goes to vLLM once, as one request with ``n`` samples."""
        media = [k for k in _MEDIA_KEYS if k in prompt_inputs]
        if media:
            raise ConfigError(
                f"rollout.engine=vllm samples text prompts only so far (this batch has {', '.join(media)}); "
                f"use rollout.engine=hf for vision-language prompts."
            )
        pol = self.policy
        with self._lock:
            self.start(model)
            ids = prompt_inputs["input_ids"].cpu()
            keep = prompt_inputs["attention_mask"].cpu().bool()
            rows = [ids[i][keep[i]].tolist() for i in range(ids.shape[0])]
            max_len = int(self.opts["max_model_len"])
            longest = max(len(r) for r in rows)
            if longest + settings.max_new_tokens > max_len:
                raise ConfigError(
                    f"a prompt of {longest} tokens + rollout.max_new_tokens={settings.max_new_tokens} exceeds "
                    f"rollout.engine_options.max_model_len={max_len}; raise it."
                )
            # one request per prompt with n samples; output row r gets seed base + r (vLLM seeds
            # the i-th sample of a request with seed + i), so a run is reproducible from torch's RNG
            base_seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if self.opts["seed"] else None
            groups: list[_Group] = []
            for i, tokens in enumerate(rows):
                if groups and groups[-1][0] == tokens:
                    groups[-1] = (tokens, groups[-1][1] + num_samples, groups[-1][2])
                else:
                    groups.append((tokens, num_samples, None if base_seed is None else base_seed + i * num_samples))
            params = self._sampling(settings)
            # vLLM refuses n > 1 with greedy sampling: ask once, copy the answer
            asked = [(t, 1, seed) for t, _, seed in groups] if settings.greedy else groups
            if self.mode == "server":
                results = self._complete_server(asked, params)
            else:
                results = self._complete_llm(asked, params)
            if settings.greedy:
                results = [r[:1] * n for r, (_, n, _) in zip(results, groups)]
        samples = [s for group in results for s in group]
        n = len(rows) * num_samples
        if len(samples) != n:
            raise RuntimeError(f"vLLM returned {len(samples)} completions for {n} rows")
        T = max(1, max(len(s.token_ids) for s in samples))
        completion = torch.full((n, T), pol.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((n, T), dtype=torch.float32)
        for i, s in enumerate(samples):
            if s.token_ids:
                completion[i, : len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.long)
                logprobs[i, : len(s.logprobs)] = torch.tensor(s.logprobs[: len(s.token_ids)], dtype=torch.float32)
        mask, truncated = completion_mask_from_ids(completion, pol.eos_token_ids)
        lengths = torch.tensor([len(s.token_ids) for s in samples])
        mask &= torch.arange(T)[None, :] < lengths[:, None]
        completion = completion.masked_fill(~mask, pol.pad_token_id)
        logprobs = logprobs.masked_fill(~mask, 0.0)
        return Generation(completion, mask, truncated, logprobs)

    # -- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights (LoRA merged) into vLLM; before the first rollout a
        no-op (vLLM then starts from the weights ``generate`` is given)."""
        if not self.started:
            return
        with self._lock:
            t0 = time.perf_counter()
            assert self._tmp is not None
            folder = write_weights(model, self._tmp / "sync")
            if self.mode == "server":
                self._post("/pause?mode=wait")
                try:
                    self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}})
                    self._post("/reset_prefix_cache")  # blocks cached under the old weights must not be reused
                finally:
                    self._post("/resume")
            else:
                self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
                self._llm.reset_prefix_cache()
            self.last_sync_s = time.perf_counter() - t0
            self.syncs += 1


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
