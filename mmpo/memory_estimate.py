"""Peak memory per phase predicted from the config and the model's shapes, before anything loads.

``estimate_memory(cfg)`` returns one :class:`PhaseEstimate` per phase (rollout, reference / old
pass, update, evaluation), each a dict of named components in bytes, per rank. What is modelled
(see ``docs/performance.md``, "Memory estimate before the run"):

- weights: the torch engine keeps fp32 weights (bf16 runs under autocast, whose cache holds a bf16
  copy of every trainable weight during the forward/backward); DeepSpeed holds the module in the
  precision's dtype, fp32 master weights in the optimizer, partitioned over ranks by ZeRO stage
  (1: optimizer states, 2: + gradients, 3: + weights), CPU offload moving them off the device;
- gradients and AdamW states (2 fp32 per trainable parameter; LoRA: adapters only);
- the frozen reference copy (full fine-tuning with a KL term; fp32, copied before the engine);
- activations of one micro batch, per token and decoder layer ``32h + 16i + 8kv`` bytes in fp32,
  ``30h + 8i + 4kv`` under bf16 autocast (h hidden, i MLP width, kv the key/value width; measured
  with ``torch.autograd.graph.saved_tensors_hooks`` on Qwen2 layers), only layer inputs with
  gradient checkpointing (plus one layer recomputed), the Prefix Grouper layout without it;
- the chunked log-softmax over the vocabulary (``rollout.logprob_chunk_size`` or the automatic
  chunk of :meth:`mmpo.policies.causal_lm.CausalLMPolicy._project`);
- KV caches of the rollout and of the no-grad passes; on CPU the process baseline.
Token trainers only; other kinds raise :class:`EstimateUnavailable`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from mmpo.memory_shapes import EstimateUnavailable, ModelShape, model_shape

GiB = 2**30
#: RSS of an ``mmpo bench`` process whose model is negligible (python, torch, transformers, the task, its
#: tokenizer/processor): ``mmpo bench configs/quickstart.yaml --steps 1 --warmup 0`` peaked at 817 MB
#: (0.36 M parameters), CPU, torch 2.x, 2026-12-03.
CPU_BASELINE = 800 * 2**20
#: device memory a CUDA process holds outside torch's allocator (context, kernels, allocator slack).
CUDA_RESERVE = 1 * GiB
#: prompt text tokens assumed when none is given (chat template, question, options); images add theirs.
DEFAULT_PROMPT_TEXT_TOKENS = 150
#: bytes per logit of one chunk of :func:`mmpo.policies.causal_lm._chunk_logprobs` at its peak, with or
#: without gradient and in any precision: the fp32 logits, log-softmax, its exp, the ``p == 0`` mask, the
#: masked log-probs and their product with p (4 + 4 + 4 + 1 + 4 + 4), alive together while the entropy is
#: summed; the autograd graph saves a subset of these and the backward's gradients reuse the freed ones.
#: Measured by RSS on CPU (n=16, T=128, V=32000): 21.3 (fp32) / 21.8 (autocast) with gradient,
#: 20.2 / 20.7 without, 2026-12-03.
LOGPROB_BYTES_PER_LOGIT = 21


@dataclass
class PhaseEstimate:
    """One phase: ``components`` name -> bytes (per rank)."""

    name: str
    components: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(self.components.values()))


@dataclass
class MemoryEstimate:
    """Every phase of a step, and the settings the numbers assume."""

    phases: list[PhaseEstimate]
    device: str  # "cuda" or "cpu"
    precision: str
    world_size: int
    zero_stage: int
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(p.total for p in self.phases)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: p.total).name

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "precision": self.precision,
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
            "settings": self.settings,
            "phases": {p.name: {"total": p.total, **p.components} for p in self.phases},
            "peak_bytes": self.peak,
            "peak_phase": self.peak_phase,
            "notes": self.notes,
        }


def act_per_token_layer(h: int, i: int, kv: int, mode: str) -> int:
    """Bytes saved for backward per token and decoder layer (``mode``: fp32 | autocast | bf16)."""
    if mode == "fp32":
        return 32 * h + 16 * i + 8 * kv
    if mode == "autocast":
        return 30 * h + 8 * i + 4 * kv
    return 16 * h + 8 * i + 4 * kv  # a bf16 module (DeepSpeed bf16): every saved tensor in bf16


def deepspeed_settings(path: str | None) -> tuple[int, bool, bool]:
    """``(zero stage, optimizer offloaded, params offloaded)`` of a DeepSpeed JSON (0, False, False: none)."""
    if not path:
        return 0, False, False
    with open(path, encoding="utf-8") as fh:
        zero = json.load(fh).get("zero_optimization", {})

    def off(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")) in ("cpu", "nvme")

    return int(zero.get("stage", 0)), off("offload_optimizer"), off("offload_param")


def image_tokens(cfg: Any, s: ModelShape) -> tuple[int, int]:
    """``(patches, merged tokens)`` of one prompt's image: the task's pixel bounds / image size, else
    the processor's ``max_pixels`` (an upper bound); 0 for text LMs."""
    if not s.is_vlm:
        return 0, 0
    opts = cfg.task.options
    hi = int(opts.get("max_pixels") or s.max_pixels or 224 * 224)
    lo = int(opts.get("min_pixels") or s.min_pixels or 0)
    side = opts.get("image_size")
    pixels = min(hi, max(lo, int(side) ** 2)) if side else hi
    unit = s.patch * s.merge
    merged = max(1, round(pixels / unit**2))
    return merged * s.merge**2, merged


def lora_trainable(cfg: Any, s: ModelShape) -> int:
    """Adapter parameters (+ the vision tower copy for ``lora.vision: full``)."""
    lora = cfg.model.lora
    r = lora.r
    dims = s.text_linear_dims()
    n = 0
    for name in lora.target_modules:
        key = name.rsplit(".", 1)[-1]
        if key not in dims:
            raise EstimateUnavailable(f"no memory estimate for LoRA target {name!r} (known: {', '.join(dims)})")
        a, b = dims[key]
        n += s.layers * r * (a + b)
    if lora.vision == "lora":
        vdims = s.vision_linear_dims()
        for name in lora.vision_target_modules:
            if name not in vdims:
                raise EstimateUnavailable(
                    f"no memory estimate for vision LoRA target {name!r} (known: {', '.join(vdims)})"
                )
            a, b = vdims[name]
            n += s.v_depth * r * (a + b)
    if lora.vision == "full":
        n += s.vision_params()
    return n


def _kind(cfg: Any) -> str:
    from mmpo.trainers import trainer_class_for
    from mmpo.trainers.kinds import TOKEN

    kind = trainer_class_for(cfg.task.name).kind
    return "token" if kind is TOKEN else str(getattr(kind, "name", kind))


def estimate_memory(
    cfg: Any, *, device: str | None = None, world_size: int | None = None, prompt_tokens: int | None = None
) -> MemoryEstimate:
    """Bytes per phase and component for ``cfg`` (a loaded RunConfig) on one rank.

    device: "cuda" / "cpu" (default: ``cfg.device``, auto = CUDA when available); world_size:
    ranks (default ``$WORLD_SIZE`` or 1); prompt_tokens: text tokens of a prompt before its image
    tokens (default 150). Raises EstimateUnavailable for trainer kinds other than tokens.
    """
    from mmpo.trainers.algorithm import kl_is_on
    from mmpo.trainers.update import update_shape

    kind = _kind(cfg)
    if kind != "token":
        raise EstimateUnavailable(f"no memory estimate for {kind!r} trainers yet (token recipes only)")
    if device is None:
        device = cfg.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    world = world_size or int(os.environ.get("WORLD_SIZE", "1") or 1)
    stage, off_opt, off_param = deepspeed_settings(cfg.deepspeed)
    s = model_shape(cfg.model)
    r, t, a, m = cfg.rollout, cfg.trainer, cfg.algorithm, cfg.model
    G, prompts = r.group_size, r.prompts_per_step
    rows = prompts * G
    shape = update_shape(cfg, rows)
    n = min(shape.micro_batch_size, rows)
    patches, img_tok = image_tokens(cfg, s)
    P = (DEFAULT_PROMPT_TEXT_TOKENS if prompt_tokens is None else prompt_tokens) + img_tok
    T = r.max_new_tokens
    P_all = s.params()
    if m.lora is not None:
        trainable = lora_trainable(cfg, s)
    else:
        trainable = P_all - (s.vision_params() if m.freeze_vision else 0)
    vision_trains = s.is_vlm and (
        (m.lora is None and not m.freeze_vision) or (m.lora is not None and m.lora.vision != "frozen")
    )
    uses_kl = kl_is_on(a)
    ds = stage > 0
    wb = 2 if ds and precision == "bf16" else 4  # bytes per weight as held on the device
    mode = "fp32" if precision == "fp32" else ("bf16" if ds else "autocast")
    ab = 4 if mode == "fp32" else 2  # activation / KV bytes in the update
    shard = world if ds else 1
    # -- what stays resident --------------------------------------------------------------------
    static: dict[str, int] = {}
    static["weights"] = 0 if (stage == 3 and off_param) else wb * P_all // (shard if stage == 3 else 1)
    if m.lora is not None and m.lora.vision == "full":
        static["weights"] += wb * s.vision_params()  # the trained tower copy beside the original
    opt_div = shard if stage >= 1 else 1
    opt = 0 if off_opt else (8 + (4 if wb == 2 else 0)) * trainable // opt_div
    static["optimizer states (AdamW" + (" + fp32 master" if wb == 2 else "") + ")"] = opt
    if uses_kl and m.lora is None:
        static["reference model copy"] = 4 * P_all
    base: dict[str, int] = {}
    if device == "cpu":
        base["process baseline (CPU)"] = CPU_BASELINE
    else:
        base["CUDA context and allocator reserve"] = CUDA_RESERVE
    grads = wb * trainable // (shard if stage >= 2 else 1) + (4 * trainable // shard if wb == 2 else 0)
    # -- helpers ----------------------------------------------------------------------------------
    kvd, h, L = s.kv_dim, s.hidden, s.layers
    V = s.vocab
    chunk = r.logprob_chunk_size or max(1, min(T, 2**16 // max(1, V // 64)))

    def kv_cache(rows_: int, length: int, nbytes: int) -> int:
        return 2 * L * rows_ * length * kvd * nbytes

    def layer_transient(tokens: int, nbytes: int) -> int:  # one layer's live tensors, no grad
        return tokens * (4 * s.intermediate * nbytes + 4 * h * 4)

    def vision_transient(n_img: int) -> int:
        if not s.is_vlm:
            return 0
        return n_img * patches * (4 * s.v_mlp + 8 * s.v_embed) * 4 + n_img * patches * 3 * 4 * s.patch**2 * s.temporal

    def distinct(rows_: int) -> int:
        if shape.shuffle:
            return min(rows_, prompts)
        return min(prompts, math.ceil(rows_ / G) + (1 if rows_ % G else 0))

    phases: list[PhaseEstimate] = []
    # -- rollout (hf engine: all prompts x G rows at once) ---------------------------------------
    kvb = wb if ds else 4  # the rollout runs outside autocast: fp32 weights -> fp32 cache
    roll = PhaseEstimate("rollout", {**base, **static})
    roll.components["KV cache (rows x (prompt + new tokens))"] = kv_cache(rows, P + T, kvb) + kv_cache(
        prompts, P + T, kvb
    )
    roll.components["prefill (one layer, vision tower)"] = layer_transient(prompts * P, kvb) + vision_transient(prompts)
    roll.components["sampling logits"] = rows * V * 4 * 4
    phases.append(roll)
    # -- no-grad log-prob passes (reference / pi_old), micro batches of n rows ----------------------
    needs_old = t.update_epochs > 1 or shape.minibatch_size < rows
    if uses_kl or needs_old:
        k = distinct(n)
        what = " + ".join(x for x, on in (("reference", uses_kl), ("old policy", needs_old)) if on)
        ref = PhaseEstimate(f"{what} pass", {**base, **static})
        ref.components["KV cache (prompts, gathered to rows)"] = kv_cache(k, P, ab) + kv_cache(n, P, ab)
        ref.components["one layer + vision tower (no grad)"] = layer_transient(k * P + n * T, ab) + vision_transient(k)
        ref.components["chunked log-softmax logits"] = n * min(chunk, T) * V * LOGPROB_BYTES_PER_LOGIT
        phases.append(ref)
    # -- update: one micro batch forward + backward -------------------------------------------------
    upd = PhaseEstimate("update", {**base, **static})
    upd.components["gradients"] = grads
    if mode == "autocast":
        upd.components["autocast bf16 weight copies"] = 2 * trainable
    per = act_per_token_layer(h, s.intermediate, kvd, mode)
    res = 2 if mode == "bf16" else 4  # the residual stream's dtype (fp32 under autocast)
    if m.attn_implementation == "eager":
        per_eager = 2 * s.heads * ab  # attention probabilities, per key
    else:
        per_eager = 0
    if m.gradient_checkpointing:  # no prefix sharing under checkpointing: every row with its prompt
        k, tokens = n, n * (P + T)
        act = tokens * L * h * res + tokens * (per + per_eager * (P + T)) + tokens * 9 * h
        shared_kv = 0
    else:
        k = distinct(n) if G > 1 and r.prefix_sharing else n
        tokens = k * P + n * T if k < n else n * (P + T)
        act = tokens * L * (per + per_eager * (P + T)) + tokens * 9 * h
        shared_kv = kv_cache(n, P, ab) * 2 if k < n else 0  # gathered prefix K/V kept for backward
    upd.components["activations (decoder)"] = act + shared_kv
    if vision_trains:
        vper = act_per_token_layer(s.v_embed, s.v_mlp, s.v_embed, mode)
        vt = k * patches
        upd.components["activations (vision tower)"] = (
            vt * s.v_depth * s.v_embed * res + vt * vper if m.gradient_checkpointing else vt * s.v_depth * vper
        )
    # one chunk at a time: recomputed under checkpointing (T > chunk), else the only chunk
    upd.components["chunked log-softmax logits (+ grad)"] = n * min(chunk, T) * V * LOGPROB_BYTES_PER_LOGIT
    step_tmp = 4 * trainable if device == "cuda" and not ds else 8 * max(V * h, s.intermediate * h)
    step_tmp = 0 if off_opt else min(step_tmp, 4 * trainable)
    live = sum(v for k, v in upd.components.items() if k.startswith(("activations", "chunked")))
    # the step runs after the micro batches: its temporaries count only beyond the freed activations
    upd.components["optimizer step temporaries (beyond activations)"] = max(0, step_tmp - live)
    phases.append(upd)
    # -- evaluation (greedy, eval.batch_size prompts) -----------------------------------------------
    if cfg.eval.num_samples > 0:
        eb = min(cfg.eval.batch_size, cfg.eval.num_samples)
        te = cfg.eval.max_new_tokens or T
        ev = PhaseEstimate("evaluation", {**base, **static})
        ev.components["KV cache (eval batch)"] = kv_cache(eb, P + te, kvb)
        ev.components["prefill (one layer, vision tower)"] = layer_transient(eb * P, kvb) + vision_transient(eb)
        phases.append(ev)
    notes = [f"prompt = {P} tokens ({P - img_tok} text + {img_tok} image), {T} new tokens, micro batch {n} rows"]
    if r.engine != "hf":
        notes.append(f"rollout.engine={r.engine}: the engine's own memory (e.g. vLLM's pool) is not included")
    settings = {
        "micro_batch_size": n,
        "gradient_checkpointing": m.gradient_checkpointing,
        "zero_stage": stage,
        "offload_optimizer": off_opt,
        "offload_param": off_param,
        "params": P_all,
        "trainable_params": trainable,
        "prompt_tokens": P,
        "max_new_tokens": T,
    }
    return MemoryEstimate(phases, device, precision, world, stage, settings, notes)
