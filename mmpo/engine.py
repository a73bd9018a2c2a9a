"""Who steps the weights: plain torch (one or several processes) or DeepSpeed ZeRO 1-3.

The trainer sees one small interface, whichever engine runs::

    engine = Engine.build(model, EngineOptions(lr=1e-5, total_steps=100, ...))
    for step in range(max_steps):
        ...                                  # rollouts with engine.module (+ gathered_params)
        for micro_batch in minibatch:        # same number of micro batches on every rank
            with engine.autocast():
                loss = compute_loss(engine.forward_module(), micro_batch)
            engine.backward(loss * weight)   # weight: this micro batch's share, e.g. 1/n_micro
        result = engine.step()               # once per minibatch -> StepResult

Gradient accumulation. ``backward`` only accumulates gradients; ``step`` is the accumulation
boundary (average over ranks, non-finite check, clip, optimizer and LR-scheduler update, zero the
grads). ``backward`` does *not* divide the loss by the number of micro batches: the caller weights
each micro-batch loss so that their sum is the minibatch loss (so a token-mean over the whole
minibatch stays exact when micro batches hold different token counts). Under DeepSpeed this uses
``"managed_gradient_accumulation": false`` (DeepSpeed 0.19+): DeepSpeed's own micro-step counter
is off and every ``step()`` is a boundary, so the number of micro batches may change from step to
step. Gradients are *averaged* over ranks: each rank's loss is its own local mean.

Collectives. With several processes every rank must call ``backward``, ``step``, ``save``,
``load``, ``save_pretrained``, ``gathered_params``, ``check_loss`` and the ``all_*`` helpers the
same number of times, in the same order; under ZeRO-3 every forward is collective too.

Non-finite values. ``backward`` of a non-finite loss keeps it away from the weights: the torch
engine skips the backward; the DeepSpeed engine back-propagates ``loss * nan`` so that every rank
still runs the same backward collectives and DeepSpeed's overflow check drops the step. ``step``
skips the update on every rank (no parameter, optimizer-state or LR-schedule change; grads are
zeroed) when any rank saw a non-finite loss or a non-finite gradient, and returns
``skipped=True``. The gradient check: torch engine, the global norm of the rank-averaged grads;
DeepSpeed ZeRO 1/2, ``is_invalid_grad_norm`` on the global norm of the reduced partitions (plus
``has_overflow``, a scan of every partition all-reduced over ranks, under bf16); ZeRO 3, the
global norm. A NaN or inf in any gradient element makes that norm non-finite on every rank.

Precision. ``bf16``: the torch engine keeps fp32 weights and runs forwards under bf16 autocast;
DeepSpeed holds the module itself in bf16 (fp32 master weights in the ZeRO optimizer), so float
inputs must be in the module's dtype there (transformers models cast pixel values themselves).

LR schedule. Update number ``k`` (0-based, counting applied updates only; skipped steps do not
advance it) uses ``lr * lr_factor(k, schedule, warmup_steps, total_steps)``: linear warmup
``(k + 1) / warmup_steps`` for ``k < warmup_steps``, then ``constant`` (1), ``linear`` (1 - p) or
``cosine`` (0.5 (1 + cos(pi p))) with ``p = (k - warmup) / (total - warmup)``, reaching 0 at
``total_steps``.

Launch. One process: ``mmpo train ...``. Several (one node or many): torchrun sets RANK /
WORLD_SIZE / LOCAL_RANK; the engine then initialises torch.distributed itself (gloo on CPU, nccl
on CUDA; the device is ``cuda:LOCAL_RANK``, rank 0 is global), e.g. ``torchrun --nnodes 2
--nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m mmpo train cfg.yaml``, the
same on each node (the c10d rendezvous numbers the nodes; see docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmpo.core.registry import Registry
from mmpo.errors import ConfigError

__all__ = [
    "EngineOptions",
    "StepResult",
    "Engine",
    "TorchEngine",
    "DeepSpeedEngine",
    "LR_SCHEDULES",
    "lr_factor",
    "resolve_device",
    "resolve_precision",
    "build_deepspeed_config",
]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
TORCH_FORMAT = "mmpo.engine.torch/1"
DEEPSPEED_FORMAT = "mmpo.engine.deepspeed/1"
DEEPSPEED_TAG = "deepspeed"


# --------------------------------------------------------------------------- options and results


@dataclass
class EngineOptions:
    """Everything the engine needs; the trainer fills it from its config.

    lr: peak learning rate of AdamW. weight_decay: decoupled decay, applied to tensors with
    ndim >= 2 only (not to biases and norm weights). max_grad_norm: clip the global grad norm to
    this (<= 0: no clipping). total_steps: optimizer updates over which the schedule runs.
    grad_accum_steps / micro_batch_size: only bookkeeping for DeepSpeed's batch-size fields (the
    trainer decides how many micro batches it feeds to one step). deepspeed_config: path to a
    DeepSpeed JSON file, or None for the plain torch engine.
    """

    lr: float
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    grad_accum_steps: int = 1
    micro_batch_size: int = 1
    device: str = "auto"
    precision: str = "auto"
    deepspeed_config: str | None = None

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is out of range."""
        if not (isinstance(self.lr, (int, float)) and self.lr >= 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        LR_SCHEDULES.get(self.lr_schedule)
        for name in ("warmup_steps",):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("total_steps", "grad_accum_steps", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")


@dataclass
class StepResult:
    """Outcome of one ``Engine.step``.

    grad_norm: global L2 norm of the (rank-averaged) gradients before clipping; inf or nan when
    the step was skipped for non-finite values. skipped: no update was applied. lr: the learning
    rate this step used (or would have used).
    """

    grad_norm: float
    skipped: bool
    lr: float


# --------------------------------------------------------------------------- LR schedule

LR_SCHEDULES: Registry[Callable[[float], float]] = Registry("lr schedule")
"""Decay shapes after warmup: progress p in [0, 1] -> factor of the peak LR."""


@LR_SCHEDULES.register("constant")
def _constant(p: float) -> float:
    return 1.0


@LR_SCHEDULES.register("linear")
def _linear(p: float) -> float:
    return 1.0 - p


@LR_SCHEDULES.register("cosine")
def _cosine(p: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * p))


def lr_factor(update: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Factor of the peak LR for optimizer update number ``update`` (0-based).

    Warmup: ``(update + 1) / warmup_steps`` while ``update < warmup_steps``; then the schedule's
    shape at progress ``p = (update - warmup_steps) / max(1, total_steps - warmup_steps)``,
    clamped to [0, 1] (so linear and cosine are 0 from ``total_steps`` on).
    """
    shape = LR_SCHEDULES.get(schedule)
    if update < warmup_steps:
        return (update + 1) / warmup_steps
    p = (update - warmup_steps) / max(1, total_steps - warmup_steps)
    return shape(min(1.0, max(0.0, p)))


def _make_optimizer(params: list[nn.Parameter], opts: EngineOptions) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (ndim >= 2) and none on biases / norm weights."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": g, "weight_decay": wd} for g, wd in ((decay, opts.weight_decay), (no_decay, 0.0)) if g]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=tuple(opts.adam_betas), eps=1e-8)


def _make_scheduler(optimizer: torch.optim.Optimizer, opts: EngineOptions) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(update: int) -> float:
        return lr_factor(update, opts.lr_schedule, opts.warmup_steps, opts.total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- device, precision


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else default


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. Under torchrun on CUDA: ``cuda:LOCAL_RANK``."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is visible; use device=cpu or auto")
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto``: ``bf16`` on CUDA, ``fp32`` on CPU. ``bf16`` on CPU is allowed (CPU autocast)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def _cache_dir() -> Path:
    root = os.environ.get("MMPO_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mmpo"


def _ensure_torch_extensions_dir() -> None:
    """DeepSpeed compiles its ops into TORCH_EXTENSIONS_DIR; keep them in mmpo's cache."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        path = _cache_dir() / "torch_extensions"
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCH_EXTENSIONS_DIR"] = str(path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the engine


class Engine:
    """Base of TorchEngine and DeepSpeedEngine: device, precision, ranks and collectives.

    Attributes: module (the unwrapped model: generate, log-prob forwards, save_pretrained),
    device, precision ("fp32" | "bf16"), rank, world_size, is_main, applied_steps,
    skipped_steps.
    """

    module: nn.Module
    device: torch.device
    precision: str
    rank: int = 0
    world_size: int = 1

    def __init__(self, opts: EngineOptions) -> None:
        opts.validate()
        self.opts = opts
        self.applied_steps = 0
        self.skipped_steps = 0
        self._backwards = 0  # backward() calls since the last step()
        self._bad_loss = False  # a non-finite loss was seen on this rank since the last step()
        self._owns_process_group = False

    @staticmethod
    def build(model: nn.Module, opts: EngineOptions) -> "Engine":
        """DeepSpeedEngine when ``opts.deepspeed_config`` is set, else TorchEngine."""
        if opts.deepspeed_config:
            return DeepSpeedEngine(model, opts)
        return TorchEngine(model, opts)

    # ---- properties
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    # ---- mixed precision
    def autocast(self) -> ContextManager:
        """bf16 autocast when precision is bf16 (CUDA or CPU); a no-op context otherwise."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- to implement
    def forward_module(self) -> nn.Module:
        """What to call for training forwards (the DeepSpeed engine, or the module itself)."""
        raise NotImplementedError

    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients of scalar ``loss`` (no division by the number of micro batches)."""
        raise NotImplementedError

    def step(self) -> StepResult:
        """Apply (or skip) one update from the gradients accumulated since the last step."""
        raise NotImplementedError

    def lr(self) -> float:
        """The learning rate the next update will use."""
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Write model, optimizer and scheduler state to ``folder`` (collective)."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        """Restore what ``save`` wrote; the next step continues exactly (collective)."""
        raise NotImplementedError

    def gathered_params(self) -> ContextManager:
        """Inside it, every parameter is whole on every rank (ZeRO-3); no-op otherwise."""
        return contextlib.nullcontext()

    def sampling(self) -> ContextManager:
        """Around a rollout on the trained module: its parameters whole (:meth:`gathered_params`)
        and bf16 autocast when the precision is bf16, so sampling runs in the precision of the
        log-prob passes (and bf16 frozen weights, ``model.frozen_dtype``, meet bf16 inputs)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.gathered_params())
        stack.enter_context(self.autocast())
        return stack

    def _full_state_dict(self) -> dict[str, Tensor] | None:
        """The full state dict on the main rank (None elsewhere); collective under ZeRO-3."""
        return self.module.state_dict() if self.is_main else None

    # ---- shared behaviour
    def check_loss(self, loss: Tensor) -> bool:
        """True when ``loss`` is finite on every rank (all-reduced; collective)."""
        ok = torch.isfinite(loss.detach()).all().to(device=self.device, dtype=torch.float32)
        if self.distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def save_pretrained(
        self,
        folder: Path,
        save_fn: Callable[[nn.Module, Path, dict[str, Tensor]], None] | None = None,
    ) -> None:
        """Write full weights in the model's own layout (collective; the main rank writes).

        ``save_fn(module, folder, state_dict)`` overrides the writer; by default
        ``module.save_pretrained(folder, state_dict=...)`` (transformers / diffusers) or, for a
        plain module, ``folder/model.safetensors``.
        """
        folder = Path(folder)
        state = self._full_state_dict()
        if self.is_main:
            assert state is not None
            folder.mkdir(parents=True, exist_ok=True)
            if save_fn is not None:
                save_fn(self.module, folder, state)
            elif hasattr(self.module, "save_pretrained"):
                self.module.save_pretrained(folder, state_dict=state)
            else:
                from safetensors.torch import save_file

                # safetensors refuses shared storage (tied weights): store copies.
                save_file(
                    {k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                    str(folder / "model.safetensors"),
                )
        self.barrier()

    def all_reduce_mean(self, x: float) -> float:
        """Mean of ``x`` over ranks (collective)."""
        if not self.distributed:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world_size

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` (collective; obj must pickle)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Tear down the process group this engine created (call once, at the end of a run)."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    def _engine_meta(self, fmt: str) -> dict[str, Any]:
        return {
            "format": fmt,
            "world_size": self.world_size,
            "applied_steps": self.applied_steps,
            "skipped_steps": self.skipped_steps,
            "options": {k: v for k, v in asdict(self.opts).items()},
        }

    def _read_meta(self, folder: Path, fmt: str) -> dict[str, Any]:
        path = Path(folder) / "engine.json"
        if not path.is_file():
            raise ConfigError(f"cannot resume: {path} does not exist (not an engine checkpoint)")
        meta = json.loads(path.read_text())
        if meta.get("format") != fmt:
            raise ConfigError(
                f"cannot resume from {folder}: it was written by engine format "
                f"{meta.get('format')!r}, this run uses {fmt!r} (keep the same deepspeed setting)"
            )
        if meta.get("world_size") != self.world_size and fmt == DEEPSPEED_FORMAT:
            raise ConfigError(
                f"cannot resume from {folder}: it was written by {meta.get('world_size')} "
                f"processes, this run has {self.world_size} (ZeRO partitions differ)"
            )
        return meta


class TorchEngine(Engine):
    """Plain torch: one process, or several under torchrun with gradients averaged at ``step``.

    Several processes: parameters and buffers are broadcast from rank 0 at start; ``step``
    all-reduces the accumulated gradients (mean over ranks) before the update, so ranks stay
    identical. Forwards run on ``module`` directly (no DDP wrapper).
    """

    def __init__(self, model: nn.Module, opts: EngineOptions) -> None:
        super().__init__(opts)
        self.device = resolve_device(opts.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(opts.precision, self.device)
        self._init_distributed()
        self.module = model.to(self.device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the model has no trainable parameters (requires_grad=True)")
        if self.distributed:
            with torch.no_grad():
                for t in list(self.module.parameters()) + list(self.module.buffers()):
                    dist.broadcast(t.data, src=0)
        self.optimizer = _make_optimizer(self.params, opts)
        self.scheduler = _make_scheduler(self.optimizer, opts)

    def _init_distributed(self) -> None:
        world = _env_int("WORLD_SIZE", 1)
        if world > 1 and not dist.is_initialized():
            kwargs: dict[str, Any] = {"backend": self._backend()}
            if self.device.type == "cuda":
                kwargs["device_id"] = self.device
            dist.init_process_group(**kwargs)
            self._owns_process_group = True
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def forward_module(self) -> nn.Module:
        return self.module

    def backward(self, loss: Tensor) -> None:
        self._backwards += 1
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = True  # keep it away from the grads; step() skips
            return
        loss.backward()

    def _average_grads(self) -> None:
        """Mean of each trainable parameter's grad over ranks; a grad no rank has stays None."""
        has = torch.tensor([p.grad is not None for p in self.params], device=self.device)
        has = has.to(torch.int32)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        grads = []
        for p, any_rank in zip(self.params, has.tolist()):
            if any_rank and p.grad is None:
                p.grad = torch.zeros_like(p)
            if any_rank:
                grads.append(p.grad)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            offset = 0
            for g in group:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def step(self) -> StepResult:
        if self._backwards == 0:
            raise RuntimeError("Engine.step() called without a backward() since the last step")
        lr = self.lr()
        if self.distributed:
            self._average_grads()
        grads = [p.grad for p in self.params if p.grad is not None]
        zero = torch.zeros((), device=self.device)
        norm = torch.nn.utils.get_total_norm(grads) if grads else zero
        bad = torch.tensor(float(self._bad_loss or not bool(torch.isfinite(norm))), device=self.device)
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        grad_norm = float(norm)
        self._backwards, self._bad_loss = 0, False
        if bool(bad.item()):
            if math.isfinite(grad_norm):  # skipped for a non-finite loss (here or on a peer)
                grad_norm = float("nan")
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return StepResult(grad_norm=grad_norm, skipped=True, lr=lr)
        if self.opts.max_grad_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.opts.max_grad_norm, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.applied_steps += 1
        return StepResult(grad_norm=grad_norm, skipped=False, lr=lr)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # ---- checkpoints: model.safetensors, optimizer.safetensors, engine.json
    def save(self, folder: Path) -> None:
        folder = Path(folder)
        if self.is_main:
            from safetensors.torch import save_file, save_model

            folder.mkdir(parents=True, exist_ok=True)
            save_model(self.module, str(folder / "model.safetensors"))
            tensors, state_meta = _split_optimizer_state(self.optimizer.state_dict())
            save_file(tensors, str(folder / "optimizer.safetensors"))
            meta = self._engine_meta(TORCH_FORMAT)
            meta["optimizer"] = state_meta
            meta["scheduler"] = self.scheduler.state_dict()
            (folder / "engine.json").write_text(json.dumps(meta, indent=1))
        self.barrier()

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file, load_model

        folder = Path(folder)
        meta = self._read_meta(folder, TORCH_FORMAT)
        load_model(self.module, str(folder / "model.safetensors"), device=str(self.device))
        tensors = load_file(str(folder / "optimizer.safetensors"), device=str(self.device))
        self.optimizer.load_state_dict(_join_optimizer_state(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        self.applied_steps = int(meta["applied_steps"])
        self.skipped_steps = int(meta["skipped_steps"])
        self._backwards, self._bad_loss = 0, False
        self.optimizer.zero_grad(set_to_none=True)


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- DeepSpeed


def _drop_auto(cfg: Any) -> Any:
    """Remove every key whose value is still "auto" (DeepSpeed's defaults then apply)."""
    if isinstance(cfg, dict):
        return {k: _drop_auto(v) for k, v in cfg.items() if v != "auto"}
    return cfg


def build_deepspeed_config(
    path: str | Path, opts: EngineOptions, precision: str, world_size: int, device_type: str
) -> dict[str, Any]:
    """Read a DeepSpeed JSON file and fill the fields mmpo owns from ``opts``.

    Set here, whatever the file says: train_micro_batch_size_per_gpu, gradient_accumulation_steps,
    train_batch_size, gradient_clipping, bf16.enabled (+ check_grad_overflow), fp16 off,
    zero_force_ds_cpu_optimizer false, managed_gradient_accumulation false,
    zero_optimization.compute_grad_norm true. ``overlap_comm: "auto"`` becomes true on CUDA (ZeRO
    2/3) and false on CPU. Other "auto" values are dropped (DeepSpeed defaults). The file must not
    define "optimizer" or "scheduler" (mmpo passes AdamW and its LR schedule) and must use ZeRO
    stage 1, 2 or 3 (for plain data parallelism leave deepspeed unset).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed config file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed config file {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"deepspeed config file {path} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in raw:
            raise ConfigError(
                f"deepspeed config {path} defines '{key}': remove it; mmpo builds AdamW and the LR "
                "schedule from the trainer settings (lr, lr_schedule, warmup_steps, ...)"
            )
    fp16 = raw.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") is True:
        raise ConfigError(f"deepspeed config {path} enables fp16; use precision=bf16 instead")
    zero = dict(raw.get("zero_optimization", {}))
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(
            f"deepspeed config {path}: zero_optimization.stage must be 1, 2 or 3, got {stage!r} "
            "(for plain data parallelism leave deepspeed unset and launch with torchrun)"
        )
    if zero.get("overlap_comm") == "auto":
        zero["overlap_comm"] = device_type == "cuda" and stage >= 2
    if stage == 1:
        # Caller-owned accumulation boundaries support overlap_comm only with ZeRO 2/3.
        zero["overlap_comm"] = False
    zero["compute_grad_norm"] = True  # the non-finite gradient check rides on the global norm
    cfg = dict(raw)
    cfg["zero_optimization"] = zero
    cfg["train_micro_batch_size_per_gpu"] = opts.micro_batch_size
    cfg["gradient_accumulation_steps"] = opts.grad_accum_steps
    cfg["train_batch_size"] = opts.micro_batch_size * opts.grad_accum_steps * world_size
    cfg["gradient_clipping"] = max(0.0, float(opts.max_grad_norm))
    bf16 = dict(raw.get("bf16", {}))
    bf16.update({"enabled": precision == "bf16", "check_grad_overflow": True})
    cfg["bf16"] = bf16
    cfg.pop("fp16", None)
    cfg["zero_force_ds_cpu_optimizer"] = False
    cfg["managed_gradient_accumulation"] = False
    cfg.setdefault("steps_per_print", 10**9)
    return _drop_auto(cfg)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 1/2/3 with mmpo's AdamW and LR schedule passed as client objects.

    ``deepspeed.initialize`` wraps the model; ``forward_module()`` is that wrapper, ``module`` the
    model inside (partitioned under ZeRO-3: use ``gathered_params()`` around ``generate``).
    Checkpoints use DeepSpeed's own format (``save_checkpoint`` under tag "deepspeed") plus
    ``engine.json``; resuming needs the same number of processes.
    """

    def __init__(self, model: nn.Module, opts: EngineOptions) -> None:
        super().__init__(opts)
        self.device = resolve_device(opts.device)
        self.precision = resolve_precision(opts.precision, self.device)
        _ensure_torch_extensions_dir()
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        else:
            torch.cuda.set_device(self.device)
        # DeepSpeed 0.19 calls torch.distributed functions that torch 2.14 marks deprecated.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        import deepspeed  # slow import (seconds): only when asked for
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator().device_name()
        if accel != self.device.type:
            raise ConfigError(
                f"device={opts.device!r} resolves to {self.device.type}, but DeepSpeed picked the "
                f"{accel} accelerator (set DS_ACCELERATOR={self.device.type} before starting)"
            )
        self._init_distributed(deepspeed)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        assert opts.deepspeed_config is not None
        self.ds_config = build_deepspeed_config(
            opts.deepspeed_config, opts, self.precision, self.world_size, self.device.type
        )
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters (requires_grad=True)")
        optimizer = _make_optimizer(params, opts)
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: _make_scheduler(opt, opts),
            config=self.ds_config,
        )
        self.module = self.ds.module

    def _init_distributed(self, deepspeed: Any) -> None:
        import logging

        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)  # DeepSpeed prints its whole config at INFO
        if "RANK" not in os.environ:  # one process without a launcher: a world of one
            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if not dist.is_initialized():
            self._owns_process_group = True
        deepspeed.init_distributed(dist_backend=self._backend(), verbose=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> ContextManager:
        """A no-op: under bf16 DeepSpeed already holds the module in bf16 (fp32 master weights
        live in the ZeRO optimizer) and its forward switches an outer CUDA autocast off anyway.
        Float inputs must be in the module's dtype (transformers models cast pixel values)."""
        return contextlib.nullcontext()

    def forward_module(self) -> nn.Module:
        return self.ds

    def backward(self, loss: Tensor) -> None:
        self._backwards += 1
        if not bool(torch.isfinite(loss.detach()).all()):
            # Every rank must run the same backward collectives, so do not skip: NaN grads make
            # DeepSpeed's overflow check drop the whole step on all ranks.
            self._bad_loss = True
            loss = loss * float("nan")
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepResult:
        if self._backwards == 0:
            raise RuntimeError("Engine.step() called without a backward() since the last step")
        lr = self.lr()
        skipped_before = self.ds.skipped_steps
        self.ds.step()
        skipped = self.ds.skipped_steps > skipped_before
        if self._bad_loss and not skipped:
            raise RuntimeError(
                "DeepSpeed applied an update after a non-finite loss; its overflow check did not "
                "fire (unsupported DeepSpeed version or config)"
            )
        norm = self.ds.get_global_grad_norm()
        grad_norm = float("nan") if norm is None else float(norm)
        self._backwards, self._bad_loss = 0, False
        if skipped:
            self.skipped_steps += 1
        else:
            self.applied_steps += 1
        return StepResult(grad_norm=grad_norm, skipped=skipped, lr=lr)

    def lr(self) -> float:
        return float(self.ds.lr_scheduler.get_last_lr()[0])

    def gathered_params(self) -> ContextManager:
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def _full_state_dict(self) -> dict[str, Tensor] | None:
        if self.zero_stage == 3:
            return self.ds._zero3_consolidated_16bit_state_dict()
        return super()._full_state_dict()

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        self.ds.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False)
        if self.is_main:
            meta = self._engine_meta(DEEPSPEED_FORMAT)
            meta["zero_stage"] = self.zero_stage
            (folder / "engine.json").write_text(json.dumps(meta, indent=1))
        self.barrier()

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        meta = self._read_meta(folder, DEEPSPEED_FORMAT)
        if meta.get("zero_stage") != self.zero_stage:
            raise ConfigError(
                f"cannot resume from {folder}: written under ZeRO stage {meta.get('zero_stage')}, "
                f"this run uses stage {self.zero_stage}"
            )
        path, _ = self.ds.load_checkpoint(
            str(folder),
            tag=DEEPSPEED_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise ConfigError(f"cannot resume: DeepSpeed found no checkpoint in {folder}")
        self.applied_steps = int(meta["applied_steps"])
        self.skipped_steps = int(meta["skipped_steps"])
        self._backwards, self._bad_loss = 0, False

    def close(self) -> None:
        self.ds.destroy()
        super().close()
