"""``mmpo bench --against trl``: mmpo's Trainer and TRL's ``GRPOTrainer`` side by side.

Both frameworks train the same model (one save_pretrained folder, loaded by both) on the
same prompts with the same reward, batch and objective, in ONE run. The settings
(:mod:`mmpo.bench_shapes`) are tiny models (``text``, ``vlm``) and random weights at real
dimensions (``text-0.5b``: Qwen2.5-0.5B, fp32 full fine-tuning; ``vlm-2b-lora``: Qwen2-VL-2B,
LoRA r 16 on the language model's attention projections with bf16 frozen weights on both sides:
mmpo's ``model.frozen_dtype: bf16``, TRL's model loaded in bf16 + ``peft_config``). The parent
process starts two worker processes, one per framework, each with the same torch thread count,
and alternates them step by step (the order flips every step: mmpo/TRL, TRL/mmpo, ...), so only
one computes at a time and slow drifts of the machine hit both alike. At the real shapes two
workers would not fit in memory together, so (``memory_mode`` blocks) one worker is alive at a
time: mmpo's steps, then TRL's. Each row also gives the model FLOPs of a step
(:func:`mmpo.bench_shapes.step_flops`, the same count for both sides), each side's model-FLOPs
utilisation against the matmul peak measured at the start, and a per-phase profile. Each worker times its own steps
(``time.perf_counter`` from the parent's "go" to the end of the optimizer step) and measures its
own resident set size (a thread samples RSS every 5 ms while a step runs); separate processes
make the memory numbers comparable. Each step's CPU time (user + system, all threads) is
reported too, and ``other_cpu_load``: the CPUs' worth of work that OTHER processes did while the
measured steps ran (from ``/proc/stat``); well above 0, the wall times are disturbed (the
alternation spreads the disturbance over both sides, the CPU times are the steadier numbers). TRL runs its normal ``trainer.train()``; a
``TrainerCallback`` blocks in ``on_train_begin`` / ``on_step_end`` until the parent says go, so a
TRL step is timed from fetching its prompt batch to ``on_step_end`` (generation, reference
pass, loss, backward, clip, AdamW step), like mmpo's ``Trainer.train_step``.

How the settings are matched (TRL 1.16 ``GRPOConfig`` defaults in brackets where we keep them):

====================================  ===========================================  =========================================
knob                                  mmpo (RunConfig)                             TRL (GRPOConfig)
====================================  ===========================================  =========================================
model                                 same folder, fp32, sdpa (``load_model``)     same folder, same loader, model object
precision                             ``precision`` of the setting (fp32;          ``bf16`` the same (TRL's default is bf16)
                                      bf16 autocast at vlm-2b-lora)
gradient checkpointing                off (``model.gradient_checkpointing``)        ``gradient_checkpointing=False`` (default on)
batch                                 ``prompts_per_step=P``, ``group_size=G``      ``per_device_train_batch_size=P*G``,
                                                                                   ``num_generations=G`` [8],
                                                                                   ``steps_per_generation=1``, grad accum 1
updates per rollout                   ``update_epochs=1``, whole-batch minibatch    ``num_iterations=1`` [1]: one optimizer
                                      (no old-logprob pass)                        step per generation batch, no old pass
completion length                     ``rollout.min_new_tokens=L``,                ``generation_kwargs={min_new_tokens: L}``,
                                      ``max_new_tokens=L``: every completion is L  ``max_completion_length=L``
never-sampled tokens                  tokenizer specials (mmpo's ``_NeverSample``)  the same ids as ``suppress_tokens``
sampling                              temperature 1, top_p 1, top_k 0              [temperature 1.0, top_p 1.0, top_k 0]
advantage                             ``grpo`` with ``eps=1e-4``                   ``scale_rewards="group"`` [group]: (r-mean)/
                                                                                   (std+1e-4), unbiased std
policy loss                           ``ppo_clip`` eps_low = eps_high = 0.2        ``epsilon=0.2`` [0.2], ``epsilon_high`` [=eps],
                                                                                   ``importance_sampling_level="token"`` [token]
aggregation                           ``loss_agg: token-mean``                     ``loss_type="dapo"`` [dapo]: sum over tokens
                                                                                   of the generation batch / its token count
KL                                    ``k3``, ``beta=0.04``, in the loss,          k3, ``beta=0.04`` [0.0],
                                      token-mean                                   ``use_bias_correction_kl=False`` [True]
truncated completions                 kept (no filter)                             ``mask_truncated_completions=False`` [False]
entropy bonus / top-entropy mask      0 / none                                     ``entropy_coef=0`` [0], ``top_entropy_quantile=1`` [1]
optimizer                             AdamW(0.9, 0.999, eps 1e-8), wd 0,           ``optim="adamw_torch"`` (default: fused),
                                      constant lr, grad-norm clip 1.0              wd 0 [0], ``lr_scheduler_type="constant"``
                                                                                   (default linear), ``max_grad_norm=1.0`` [1.0]
learning rate                         1e-5                                         1e-5 (default 1e-6)
reward                                :func:`vowel_fraction` of the completion     the same function
logging / saving / eval               none (``train_step`` only, eval off)         ``report_to="none"``, ``save_strategy="no"``,
                                                                                   ``logging_steps`` huge, no eval, no tqdm
====================================  ===========================================  =========================================

``use_bias_correction_kl`` is switched off because TRL's default multiplies the k3 term by the
(differentiable, on-policy equal to 1) importance ratio, which changes the KL gradient; off, both
sides optimise the same objective. The cost of that multiply is negligible either way.

Unavoidable differences: mmpo also masks the never-sampled tokens in its training log-softmax
(TRL only at sampling); TRL runs the model in ``train()`` mode (``disable_dropout=True``, and the
tiny models have no dropout), mmpo in ``eval()`` mode; prompt order differs (each framework
shuffles its own sampler) but every prompt has the same token length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from mmpo.bench_shapes import LORA_TARGETS, SHAPES, ModelDims, matmul_peak_gflops, step_flops

SETTINGS = tuple(SHAPES)
MEMORY_MODES = ("auto", "alternate", "blocks")
SIDES = ("mmpo", "trl")
VOWELS = frozenset("aeiouAEIOU")


# ---------------------------------------------------------------------------------------------
# what both sides share: the spec, the prompts, the reward, the model folder
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchSpec:
    """One setting of the comparison (the same spec goes to both workers)."""

    setting: str = "text"  # a key of mmpo.bench_shapes.SHAPES ("text": tiny qwen2; "vlm": tiny qwen2_vl + image ...)
    model_dir: str = ""  # the save_pretrained folder both sides load
    group_size: int = 8
    prompts_per_step: int | None = None  # None: the setting's own (4; 2 at the real shapes)
    max_new_tokens: int | None = None  # every completion has exactly this many tokens (EOS suppressed); None: 32 / 64
    image_size: int | None = None  # None: 560 px (tiny vlm: 400 image tokens per prompt), 448 px at vlm-2b-lora (256)
    steps: int = 5
    warmup: int = 2
    threads: int = 2
    lr: float = 1e-5
    beta: float | None = None  # None: the setting's own (0.04 for the tiny ones, 0 at the real shapes)
    epsilon: float = 0.2
    seed: int = 0
    precision: str = ""  # "fp32" | "bf16" on both sides; "": the setting's own (SHAPES)
    memory_mode: str = "auto"  # alternate: both workers alive, step by step; blocks: one at a time; auto: by shape

    @property
    def shape(self) -> Any:
        return SHAPES[self.setting]

    def resolved(self) -> "BenchSpec":
        """This spec with the setting's defaults filled in where a field is None."""
        sh = self.shape
        return dataclasses.replace(
            self,
            prompts_per_step=self.prompts_per_step or sh.prompts_per_step,
            max_new_tokens=self.max_new_tokens or sh.max_new_tokens,
            image_size=self.image_size or sh.image_size,
        )

    @property
    def kl_beta(self) -> float:
        return self.shape.beta if self.beta is None else self.beta

    @property
    def dtype_name(self) -> str:
        return self.precision or self.shape.precision

    @property
    def blocks(self) -> bool:
        return self.memory_mode == "blocks" or (self.memory_mode == "auto" and self.shape.real)

    @property
    def num_train(self) -> int:
        return self.prompts_per_step * (self.steps + self.warmup)

    @property
    def total_steps(self) -> int:
        return self.steps + self.warmup


def vowel_fraction(text: str) -> float:
    """The reward of both sides: the share of vowels among the completion's characters (0 for
    an empty completion). Deterministic, cheap and independent of the completion's length."""
    return sum(c in VOWELS for c in text) / len(text) if text else 0.0


#: the benchmark's own question (the same text, so the same length, for every prompt)
QUESTION = "What colour are the shapes? Options: red, green, blue, yellow. Answer with one option."
BENCH_COLOURS = ((220, 40, 40), (40, 180, 60), (50, 80, 230), (230, 210, 40))


def make_prompt(setting: str, index: int, image_size: int) -> tuple[str, Any]:
    """(question text, PIL image or None) of prompt ``index``: a colour question about 1-4
    squares on a dark ground; the vlm setting adds the image (seeded by ``index``)."""
    from PIL import Image, ImageDraw

    if not SHAPES[setting].image:
        return QUESTION, None
    rng = random.Random(f"bench-trl-{index}")
    img = Image.new("RGB", (image_size, image_size), (30, 30, 30))
    draw = ImageDraw.Draw(img)
    cell, fill = image_size // 2, rng.choice(BENCH_COLOURS)
    for c in rng.sample(range(4), rng.randint(1, 4)):
        size = rng.randint(int(cell * 0.75), int(cell * 0.85))
        x0, y0 = (c % 2) * cell + rng.randint(0, cell - size), (c // 2) * cell + rng.randint(0, cell - size)
        draw.rectangle((x0, y0, x0 + size - 1, y0 + size - 1), fill=fill)
    return QUESTION, img


def prepare_model(setting: str, folder: Path, spec: BenchSpec) -> Path:
    """Write the model of ``setting`` into ``folder`` (its files linked from mmpo's tiny cache, where
    the random weights are built once at the setting's dimensions) with ``min_new_tokens =
    max_new_tokens`` in its generation config, so EOS is never sampled and every completion is
    exactly ``max_new_tokens`` long on both sides."""
    from mmpo.models import ensure_tiny

    if setting not in SHAPES:
        raise ValueError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
    shape = SHAPES[setting]
    overrides = dict(shape.sizes)
    if shape.image:  # the processor must keep the whole image: max_pixels covers image_size^2
        overrides["max_pixels"] = max(spec.image_size**2, 28 * 28 * 4)
    src = ensure_tiny(shape.kind, seed=spec.seed, overrides=overrides or None)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for f in src.iterdir():  # linked, not copied: the real shapes' weights are gigabytes
        if f.name != "generation_config.json":
            (folder / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())
    gen_file = folder / "generation_config.json"
    gen = json.loads((src / "generation_config.json").read_text())
    gen["min_new_tokens"] = spec.max_new_tokens
    gen_file.write_text(json.dumps(gen, indent=2))
    return folder


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_name(device: Any, threads: int) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} CPU, {threads} torch threads per side"


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------


class _Channel:
    """Line-delimited JSON to the parent on the original stdout; commands from stdin. Everything
    the libraries print goes to stderr (fd 1 is pointed at fd 2)."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    def receive(self) -> str:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit("bench_trl worker: the parent closed the channel")
        return line.strip()


class _RSSMonitor:
    """Peak RSS (MB) while a step runs: sampled every 5 ms by a thread, plus at each step's end."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0.0
        self._active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> float:
        return self._proc.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._active.wait(timeout=0.05):
                self.peak = max(self.peak, self._rss())
                time.sleep(0.005)

    def start(self) -> None:
        self._active.set()

    def stop(self) -> None:
        self._active.clear()
        self.peak = max(self.peak, self._rss())

    def close(self) -> None:
        self._stop.set()


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (from /proc/stat), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _watched(module: Any) -> Any:
    """The last trainable weight (the LM head or a final norm; LoRA: the last adapter's B)."""
    return [p for p in module.parameters() if p.requires_grad][-1]


def _snapshot(module: Any) -> Any:
    return _watched(module).detach().float().clone()


def _delta(module: Any, before: Any) -> float:
    return float((_watched(module).detach().float() - before).abs().max())


def _mmpo_task_class() -> type:
    """The mmpo task of the benchmark (same prompts and reward as the TRL dataset)."""
    import torch

    from mmpo.tasks import RewardOutput, Sample, TokenTask

    @dataclasses.dataclass
    class Config:
        setting: str = "text"
        image_size: int = 560
        num_train: int = 64

    class BenchTRLTask(TokenTask):
        name = "bench_trl"
        description = "mmpo bench --against trl: colour questions, vowel-fraction reward"

        def num_train(self) -> int:
            return self.config.num_train

        def train_sample(self, index: int) -> Sample:
            text, image = make_prompt(self.config.setting, index % self.config.num_train, self.config.image_size)
            content: Any = (
                text if image is None else [{"type": "image", "image": image}, {"type": "text", "text": text}]
            )
            return Sample(id=f"bench-{index}", messages=[{"role": "user", "content": content}])

        def eval_samples(self, n: int) -> list[Sample]:
            return [self.train_sample(i) for i in range(n)]

        def reward(self, samples: list[Sample], completions: list[str]) -> RewardOutput:
            return RewardOutput(rewards=torch.tensor([vowel_fraction(c) for c in completions], dtype=torch.float32))

    BenchTRLTask.Config = Config
    return BenchTRLTask


def mmpo_run_config(spec: BenchSpec) -> Any:
    """The mmpo RunConfig matching TRL's GRPOConfig of :func:`trl_config` (see the module docstring)."""
    from mmpo.config import RunConfig, from_dict
    from mmpo.tasks import TASKS

    if "bench_trl" not in TASKS:
        TASKS.add("bench_trl", _mmpo_task_class())
    data = {
        "task": {
            "name": "bench_trl",
            "setting": spec.setting,
            "image_size": spec.image_size,
            "num_train": spec.num_train,
        },
        "seed": spec.seed,
        "precision": spec.dtype_name,
        "model": {
            "path": spec.model_dir,
            "attn_implementation": "sdpa",
            "gradient_checkpointing": False,
            "lora": (
                {"r": spec.shape.lora_r, "alpha": 2 * spec.shape.lora_r, "target_modules": LORA_TARGETS}
                if spec.shape.lora_r
                else None
            ),
            "frozen_dtype": "bf16" if spec.shape.frozen_bf16 else "fp32",
        },
        "rollout": {
            "engine": "hf",
            "min_new_tokens": spec.max_new_tokens,
            "group_size": spec.group_size,
            "prompts_per_step": spec.prompts_per_step,
            "max_new_tokens": spec.max_new_tokens,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
        },
        "algorithm": {
            "advantage": "grpo",
            "advantage_options": {"eps": 1e-4},
            "loss": "ppo_clip",
            "loss_options": {"eps_low": spec.epsilon, "eps_high": spec.epsilon},
            "loss_agg": "token-mean",
            "kl_estimator": "k3",
            "kl_schedule": "constant",
            "kl_options": {"beta": spec.kl_beta},
            "kl_placement": "loss",
            "entropy_coef": 0.0,
        },
        "trainer": {
            "max_steps": spec.total_steps,
            "update_epochs": 1,
            "minibatch_size": 0,
            "micro_batch_size": 0,
            "lr": spec.lr,
            "lr_schedule": "constant",
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "save_every": 0,
            "eval_every": 0,
            "eval_at_start": False,
        },
        "eval": {"num_samples": 0},
    }
    return from_dict(RunConfig, data, source="mmpo bench --against trl")


def _run_mmpo_worker(spec: BenchSpec, chan: _Channel) -> None:
    from mmpo.trainers.token import Trainer

    cfg = mmpo_run_config(spec)
    with tempfile.TemporaryDirectory(prefix="mmpo-bench-trl-") as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        module = trainer.engine.module
        prompt_tokens = int(trainer.policy.encode(trainer.task.train_sample(0).messages)["input_ids"].shape[1])
        before = _snapshot(module)
        mon = _RSSMonitor()
        chan.send({"ready": True, "device": _device_name(trainer.device, spec.threads)})
        rows = []
        for step in range(spec.total_steps):
            cmd = chan.receive()
            if cmd != "step":
                raise SystemExit(f"bench_trl worker: expected 'step', got {cmd!r}")
            mon.start()
            t0 = time.perf_counter()
            f0, c0 = _faults(), _cpu_s()
            m = trainer.train_step(step)
            dt = time.perf_counter() - t0
            cpu = _cpu_s() - c0
            mon.stop()
            row = {
                "step": step,
                "s": dt,
                "cpu_s": cpu,
                "profile": {"rollout": m["rollout_s"], "reward": m["reward_s"], "update": m["update_s"]},
                "loss": m.get("loss", float("nan")),
                "kl": m.get("kl", float("nan")),
                "reward_mean": m["reward_mean"],
                "completion_tokens": m["response_length"],
                "prompt_tokens": prompt_tokens,
                "minor_faults": _faults() - f0,
            }
            rows.append(row)
            chan.send(row)
        chan.receive()  # "finish"
        mon.close()
        chan.send(
            {"done": True, "peak_rss_mb": mon.peak, "maxrss_mb": _maxrss_mb(), "weight_delta": _delta(module, before)}
        )


def trl_config(spec: BenchSpec, output_dir: str, suppress_tokens: list[int]) -> Any:
    """TRL's GRPOConfig matching :func:`mmpo_run_config` (see the module docstring)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir,
        seed=spec.seed,
        max_steps=spec.total_steps,
        per_device_train_batch_size=spec.prompts_per_step * spec.group_size,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=spec.group_size,
        num_iterations=1,
        max_completion_length=spec.max_new_tokens,
        generation_kwargs={"min_new_tokens": spec.max_new_tokens, "suppress_tokens": suppress_tokens},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        beta=spec.kl_beta,
        epsilon=spec.epsilon,
        epsilon_high=spec.epsilon,
        loss_type="dapo",
        scale_rewards="group",
        importance_sampling_level="token",
        mask_truncated_completions=False,
        use_bias_correction_kl=False,
        top_entropy_quantile=1.0,
        entropy_coef=0.0,
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=spec.dtype_name == "bf16",
        use_cpu=spec.dtype_name == "bf16" and not _cuda(),  # transformers refuses bf16 on CPU without it
        fp16=False,
        gradient_checkpointing=False,
        disable_dropout=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10**9,
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _run_trl_worker(spec: BenchSpec, chan: _Channel) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from mmpo.lora import lora_target_regex, vision_tower_prefix
    from mmpo.models import load_model

    dtype = torch.bfloat16 if spec.shape.frozen_bf16 else torch.float32
    model, processor, info = load_model(spec.model_dir, attn_implementation="sdpa", dtype=dtype)
    peft_config = None
    if spec.shape.lora_r:  # the same adapters as mmpo's model.lora (language model only)
        from peft import LoraConfig

        prefix = vision_tower_prefix(model) if info.is_vlm else None
        target = lora_target_regex(LORA_TARGETS, prefix)
        peft_config = LoraConfig(r=spec.shape.lora_r, lora_alpha=2 * spec.shape.lora_r, target_modules=target)
    suppress = sorted(set(info.special_token_ids) | ({model.config.image_token_id} if info.is_vlm else set()))
    rows_data = []
    for i in range(spec.num_train):
        text, image = make_prompt(spec.setting, i, spec.image_size)
        row: dict[str, Any] = {"prompt": [{"role": "user", "content": text}]}
        if image is not None:
            row["image"] = image
        rows_data.append(row)
    dataset = Dataset.from_list(rows_data)

    def vowel_reward(completions: list[Any], **kwargs: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [vowel_fraction(t) for t in texts]

    mon = _RSSMonitor()
    stats: dict[str, float] = {}

    class Lockstep(TrainerCallback):
        """Blocks until the parent says go; times from go to the end of the optimizer step."""

        t0 = 0.0
        f0 = 0
        c0 = 0.0

        def _go(self) -> None:
            cmd = chan.receive()
            if cmd != "step":
                raise SystemExit(f"bench_trl worker: expected 'step', got {cmd!r}")
            mon.start()
            self.f0, self.c0 = _faults(), _cpu_s()
            self.t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            # ready only now: train()'s own setup (optimizer, dataloader) must not overlap mmpo's steps
            chan.send({"ready": True, "device": _device_name(args.device, spec.threads)})
            self._go()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            dt = time.perf_counter() - self.t0
            cpu = _cpu_s() - self.c0
            mon.stop()
            metrics = trainer._metrics["train"]
            gen_s, train_s = stats.get("generate_s", 0.0), stats.get("train_s", 0.0)
            chan.send(
                {
                    "step": state.global_step - 1,
                    "s": dt,
                    "cpu_s": cpu,
                    # generation + reference pass + reward | policy forward + backward | optimizer and the rest
                    "profile": {"generate_score": gen_s, "policy_pass": train_s, "other": dt - gen_s - train_s},
                    "loss": stats.get("loss", float("nan")),
                    "kl": metrics["kl"][-1] if metrics.get("kl") else float("nan"),
                    "reward_mean": metrics["reward"][-1] if metrics.get("reward") else float("nan"),
                    "completion_tokens": stats.get("completion_tokens", float("nan")),
                    "prompt_tokens": stats.get("prompt_tokens", float("nan")),
                    "minor_faults": _faults() - self.f0,
                }
            )
            if state.global_step < spec.total_steps:
                self._go()
            else:  # hold the rest of train() until the parent has all its steps
                chan.receive()  # "finish"

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=vowel_reward,
            args=trl_config(spec, tmp, suppress),
            train_dataset=dataset,
            processing_class=processor,
            callbacks=[Lockstep()],
            peft_config=peft_config,
        )
        # read what the step produced (prompt/completion lengths, loss) without changing it
        generate_and_score = trainer._generate_and_score_completions
        training_step = trainer.training_step

        def observed_generate(inputs: Any) -> Any:
            t0 = time.perf_counter()
            out = generate_and_score(inputs)
            stats["generate_s"] = time.perf_counter() - t0
            stats["prompt_tokens"] = float(out["prompt_mask"].sum(1).float().mean())
            stats["completion_tokens"] = float(out["completion_mask"].sum(1).float().mean())
            return out

        def observed_step(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            loss = training_step(*args, **kwargs)
            stats["train_s"] = time.perf_counter() - t0 - stats.get("generate_s", 0.0)
            stats["loss"] = float(loss.detach())
            return loss

        trainer._generate_and_score_completions = observed_generate
        trainer.training_step = observed_step
        module = trainer.model
        before = _snapshot(module)
        trainer.train()
        mon.close()
        chan.send(
            {"done": True, "peak_rss_mb": mon.peak, "maxrss_mb": _maxrss_mb(), "weight_delta": _delta(module, before)}
        )


def worker_main(side: str, spec_json: str) -> int:
    """Entry of a worker process: ``python -m mmpo.bench_trl worker SIDE SPEC_JSON``."""
    chan = _Channel()
    spec = BenchSpec(**json.loads(spec_json))
    import torch

    torch.set_num_threads(spec.threads)
    try:
        (_run_mmpo_worker if side == "mmpo" else _run_trl_worker)(spec, chan)
    except BaseException as e:  # tell the parent, then fail loudly
        chan.send({"error": f"{type(e).__name__}: {e}"})
        raise
    return 0


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------


def _wait_until_quiet(max_wait_s: float, threshold: float = 0.25, window_s: float = 0.25) -> tuple[float, bool]:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold`` CPUs over a
    ``window_s`` window; called between steps, when neither worker computes. Returns (seconds
    waited, whether the machine was quiet)."""
    t0 = time.perf_counter()
    if max_wait_s <= 0 or _machine_busy_s() is None:
        return 0.0, True
    while True:
        b0, w0 = _machine_busy_s(), time.perf_counter()
        time.sleep(window_s)
        load = (_machine_busy_s() - b0) / (time.perf_counter() - w0)
        if load < threshold:
            return time.perf_counter() - t0, True
        if time.perf_counter() - t0 > max_wait_s:
            return time.perf_counter() - t0, False


class _Worker:
    def __init__(self, side: str, spec: BenchSpec, log_path: Path) -> None:
        self.side = side
        self.log_path = log_path
        env = dict(os.environ)
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(spec.threads)
        env.update(
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            WANDB_DISABLED="true",
            PYTHONUNBUFFERED="1",
        )
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mmpo.bench_trl", "worker", side, json.dumps(dataclasses.asdict(spec))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"the {self.side} worker exited (code {self.proc.returncode}):\n{self.log_tail()}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"the {self.side} worker failed: {msg['error']}\n{self.log_tail()}")
        return msg

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def ready(self) -> dict[str, Any]:
        return self._read()

    def step(self) -> dict[str, Any]:
        self.send("step")
        return self._read()

    def finish(self) -> dict[str, Any]:
        self.send("finish")
        out = self._read()
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self._log.close()
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def run_setting(spec: BenchSpec, workdir: Path, progress: Any = None, wait_quiet_s: float = 0.0) -> dict[str, Any]:
    """Run one setting: both workers, alternating step by step; returns the JSON row.

    ``wait_quiet_s`` > 0: before each step wait up to that long for other processes to leave
    the CPUs alone (on a shared machine, a busy core makes multi-threaded steps many times slower)."""
    folder = prepare_model(spec.setting, workdir / f"model-{spec.setting}", spec)
    spec = dataclasses.replace(spec, model_dir=str(folder))
    peak = matmul_peak_gflops(spec.threads, spec.dtype_name)
    rows: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    ready: dict[str, dict[str, Any]] = {}
    done: dict[str, dict[str, Any]] = {}

    def one_step(worker: _Worker) -> None:
        waited, quiet = _wait_until_quiet(wait_quiet_s)
        busy0, wall0 = _machine_busy_s(), time.perf_counter()
        row = worker.step()
        busy1, wall1 = _machine_busy_s(), time.perf_counter()
        row.update(waited_s=waited, quiet=quiet, wall_s=wall1 - wall0)
        row["machine_busy_s"] = None if busy0 is None or busy1 is None else busy1 - busy0
        rows[worker.side].append(row)
        if progress:
            r, step = row, len(rows[worker.side]) - 1
            progress(
                f"[{spec.setting}] {worker.side} step {step + 1}/{spec.total_steps}"
                + ("" if step >= spec.warmup else " (warmup)")
                + f"  {r['s']:.2f}s (cpu {r['cpu_s']:.2f}s, {r['completion_tokens']:.1f} tok"
                + (f", waited {r['waited_s']:.1f}s" if r["waited_s"] >= 0.5 else "")
                + ("" if r["quiet"] else ", machine busy")
                + ")"
            )

    # alternate: both workers alive, steps interleaved (the order flips every step); blocks: one
    # worker alive at a time (all mmpo's steps, then all TRL's), for shapes where two would not fit
    blocks = [SIDES] if not spec.blocks else [(side,) for side in SIDES]
    for block in blocks:
        workers = {side: _Worker(side, spec, workdir / f"{spec.setting}-{side}.log") for side in block}
        try:
            ready.update({side: w.ready() for side, w in workers.items()})  # load at once
            for step in range(spec.total_steps):
                for side in block if step % 2 == 0 else block[::-1]:
                    one_step(workers[side])
            done.update({side: w.finish() for side, w in workers.items()})
        except BaseException:
            for w in workers.values():
                w.kill()
            raise
    measured = {side: rows[side][spec.warmup :] for side in SIDES}
    med = {side: statistics.median(r["s"] for r in measured[side]) for side in SIDES}

    # CPUs' worth of work by other processes while the measured steps ran (0: a quiet machine):
    # the machine's busy time during the steps less the workers' own CPU time, per second
    other_load = None
    all_measured = [r for side in SIDES for r in measured[side]]
    if all(r["machine_busy_s"] is not None for r in all_measured):
        busy = sum(r["machine_busy_s"] - r["cpu_s"] for r in all_measured)
        other_load = round(max(0.0, busy / sum(r["wall_s"] for r in all_measured)), 2)

    def mean(side: str, key: str) -> float:
        return round(statistics.fmean(r[key] for r in rows[side]), 4)

    dims = ModelDims.from_config(json.loads((folder / "config.json").read_text()))
    image_tokens = (spec.image_size // 28) ** 2 if spec.shape.image else 0.0
    flops = step_flops(
        dims,
        rows=spec.group_size * spec.prompts_per_step,
        prompt_tokens=mean("mmpo", "prompt_tokens"),
        completion_tokens=mean("mmpo", "completion_tokens"),
        image_tokens=image_tokens,
        lora=bool(spec.shape.lora_r),
        vision_trained=spec.shape.image and not spec.shape.lora_r,
        reference=spec.kl_beta > 0,
    )
    profile = {
        side: {
            k: round(statistics.median(r["profile"][k] for r in measured[side]), 3)
            for k in measured[side][0]["profile"]
        }
        for side in SIDES
    }
    return {
        "setting": spec.setting,
        "mmpo_s_per_step": round(med["mmpo"], 4),
        "trl_s_per_step": round(med["trl"], 4),
        "ratio": round(med["mmpo"] / med["trl"], 3),
        "mmpo_peak_rss_mb": round(done["mmpo"]["peak_rss_mb"], 1),
        "trl_peak_rss_mb": round(done["trl"]["peak_rss_mb"], 1),
        "mmpo_cpu_s_per_step": round(statistics.median(r["cpu_s"] for r in measured["mmpo"]), 4),
        "trl_cpu_s_per_step": round(statistics.median(r["cpu_s"] for r in measured["trl"]), 4),
        "other_cpu_load": other_load,
        "steps_started_busy": sum(not r["quiet"] for side in SIDES for r in measured[side]),
        "precision": spec.dtype_name,
        "lora_r": spec.shape.lora_r,
        "memory_mode": "blocks: one worker alive at a time (mmpo's steps, then TRL's)"
        if spec.blocks
        else "alternate: both workers alive, alternating step by step",
        "matmul_peak_gflops": round(peak, 1),
        "model_gflop_per_step": round(flops["total"] / 1e9, 1),
        "mfu": {side: round(flops["total"] / med[side] / (peak * 1e9), 3) for side in SIDES},
        "profile_s": profile,
        "device": ready["mmpo"]["device"],
        "threads": spec.threads,
        "steps": spec.steps,
        "warmup": spec.warmup,
        "G": spec.group_size,
        "prompts_per_step": spec.prompts_per_step,
        "completion_tokens": {"mmpo": mean("mmpo", "completion_tokens"), "trl": mean("trl", "completion_tokens")},
        "prompt_tokens": {"mmpo": mean("mmpo", "prompt_tokens"), "trl": mean("trl", "prompt_tokens")},
        "reward_mean": {"mmpo": mean("mmpo", "reward_mean"), "trl": mean("trl", "reward_mean")},
        "kl_last": {side: rows[side][-1]["kl"] for side in SIDES},
        "loss_finite": {side: all(math.isfinite(r["loss"]) for r in rows[side]) for side in SIDES},
        "weight_delta": {side: done[side]["weight_delta"] for side in SIDES},
        "maxrss_mb": {side: round(done[side]["maxrss_mb"], 1) for side in SIDES},
        "s_per_step_all": {side: [round(r["s"], 4) for r in measured[side]] for side in SIDES},
    }


def run_against_trl(
    settings: list[str] | tuple[str, ...] = SETTINGS,
    *,
    steps: int = 5,
    warmup: int = 2,
    threads: int | None = None,
    progress: Any = None,
    wait_quiet_s: float = 0.0,
    **spec_fields: Any,
) -> Iterator[dict[str, Any]]:
    """Yield one JSON-able row per setting (see :func:`run_setting`)."""
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        from mmpo.errors import ConfigError

        raise ConfigError(
            f"mmpo bench --against trl needs TRL and datasets ({e}); install them with pip install -e '.[bench]'"
        ) from None
    from mmpo.errors import ConfigError

    for s in settings:
        if s not in SETTINGS:
            raise ConfigError(f"unknown bench setting {s!r}; choose from {', '.join(SETTINGS)}")
    if not settings:
        raise ConfigError(f"no bench setting given; choose from {', '.join(SETTINGS)}")
    checks = {
        "steps": (steps, 1),
        "warmup": (warmup, 0),
        "group_size": (spec_fields.get("group_size", 2), 2),
        "prompts_per_step": (spec_fields.get("prompts_per_step") or 1, 1),
        "max_new_tokens": (spec_fields.get("max_new_tokens") or 1, 1),
        "threads": (threads or 1, 1),
    }
    for name, (value, low) in checks.items():
        if value < low:
            raise ConfigError(f"mmpo bench --against trl: {name} must be >= {low}, got {value}")
    if spec_fields.get("precision") not in (None, "", "fp32", "bf16"):
        raise ConfigError(f"mmpo bench --against trl: precision must be fp32 or bf16, got {spec_fields['precision']!r}")
    if spec_fields.get("memory_mode", "auto") not in MEMORY_MODES:
        raise ConfigError(
            f"mmpo bench --against trl: memory mode must be one of {', '.join(MEMORY_MODES)}, "
            f"got {spec_fields['memory_mode']!r}"
        )
    if spec_fields.get("beta") is not None and spec_fields["beta"] < 0:
        raise ConfigError(f"mmpo bench --against trl: beta must be >= 0, got {spec_fields['beta']}")
    if (spec_fields.get("image_size") or 28) % 28 or (spec_fields.get("image_size") or 28) <= 0:
        raise ConfigError(
            f"mmpo bench --against trl: image_size must be a positive multiple of 28, got {spec_fields['image_size']}"
        )
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="mmpo-vs-trl-") as tmp:
        for s in settings:
            spec = BenchSpec(setting=s, steps=steps, warmup=warmup, threads=threads, **spec_fields).resolved()
            yield run_setting(spec, Path(tmp), progress=progress, wait_quiet_s=wait_quiet_s)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        raise SystemExit(worker_main(sys.argv[2], sys.argv[3]))
    raise SystemExit("usage: python -m mmpo.bench_trl worker SIDE SPEC_JSON (started by `mmpo bench --against trl`)")
