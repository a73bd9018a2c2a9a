"""``find``: FIND (``vpx-ecnu/FIND``, ``dist_train2.py``): RL on the initial noise x_T.

The denoiser and the reward are frozen; the policy is a diagonal Gaussian over x_T, so each
image is a one-step MDP: action x_T, reward of the image the deterministic sampler (ODE / DDIM
eta=0) makes from it. ``A = R - V`` with a small value network ("reward calibration", trained by
MSE), ratio to the previous iteration's Gaussian hard-clamped to [0.8, 1.2] (the core's
``no_clip_pg`` loss with ``mode: clamp``, weight w_R), plus ``w_KL (|mu|^2 + |sigma - 1|^2)``
pulling toward N(0, I).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmpo.checkpoint import load_state_tensors, save_state_tensors
from mmpo.core import aggregate
from mmpo.diffusion.trainer import DiffusionTrainerBase
from mmpo.errors import ConfigError
from mmpo.policies.denoising import DenoisingPolicy
from mmpo.policies.gaussian import NoisePolicy, diag_gaussian_log_prob
from mmpo.tasks import Sample
from mmpo_tasks.diffusion.task import TextToImageConfig, TextToImageTask


@dataclass
class FindConfig(TextToImageConfig):
    policy: Literal["per_prompt", "conditioned"] = field(
        default="per_prompt", metadata={"help": "'per_prompt': a (mu, sigma) per training prompt (FIND); 'conditioned': a linear map from the pooled prompt embedding (generalises to unseen prompts)."}
    )
    sigma_init: float = field(default=1.0, metadata={"help": "Initial sigma (mu starts at 0: the pipeline's own N(0, I)).", "gt": 0.0})
    sigma_min: float = field(default=1e-4, metadata={"help": "Lower clamp of sigma (FIND: 1e-4).", "gt": 0.0})
    baseline: Literal["value", "group", "none"] = field(
        default="value", metadata={"help": "'value': A = R - V(mu, sigma, prompt) with a value net trained by MSE (FIND's reward calibration); 'group': the algorithm.advantage estimator over each prompt's G samples; 'none': A = R."}
    )
    value_lr: float = field(default=1e-4, metadata={"help": "Value-net learning rate (FIND: 1e-4).", "gt": 0.0})
    value_steps: int = field(default=5, metadata={"help": "Value-net MSE steps per iteration (FIND: 5).", "min": 1})
    value_hidden: int = field(default=64, metadata={"help": "Value-net hidden width.", "min": 1})
    reg_weight: float = field(default=0.01, metadata={"help": "w_KL of the pull toward N(0, I) (FIND: 0.01).", "min": 0.0})
    reg_warmup_steps: int = field(default=0, metadata={"help": "Ramp w_KL linearly from 0 over this many steps (FIND's optional warm-up).", "min": 0})


class FindTask(TextToImageTask):
    name = "find"
    description = "FIND: RL on the initial noise of a frozen text-to-image model (one-step MDP) with image rewards"
    Config = FindConfig

    @classmethod
    def trainer_class(cls) -> type:
        return FindTrainer


class ValueNet(nn.Module):
    """``V(features [B, F]) -> [B]``: an MLP over the prompt embedding and summary statistics of (mu, sigma)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.float()).squeeze(-1)


@dataclass
class NoiseBatch:
    rows: list[Sample]
    index: torch.Tensor  # [N] prompt index (per_prompt policy)
    cond: torch.Tensor  # [N, D] pooled prompt embedding
    x_T: torch.Tensor  # [N, C, h, w]
    logp_old: torch.Tensor  # [N]
    rewards: torch.Tensor
    advantages: torch.Tensor


class FindTrainer(DiffusionTrainerBase):
    def build_trainable(self) -> torch.nn.Module:
        c: FindConfig = self.task.config
        if self.cfg.model.lora is not None:
            raise ConfigError("task find trains the noise distribution; the denoiser is frozen, so model.lora must be null")
        s = c.sampling
        self.decoder = DenoisingPolicy(self.model, guidance_scale=s.guidance_scale)
        self.schedule = self.model.schedule(s.num_steps, self.height, self.width)
        self.eval_schedule = self.model.schedule(s.eval_num_steps, self.height, self.width)
        self.prompt_index = {p.text: i for i, p in enumerate(self.task.prompts)}
        if c.policy == "per_prompt":
            missing = [p.text for p in self.task.eval_prompt_list if p.text not in self.prompt_index]
            if missing:
                raise ConfigError(
                    f"task.policy per_prompt learns a noise distribution per training prompt; eval prompts {missing[:3]} "
                    "are not training prompts (set task.eval_prompts null, or task.policy conditioned)"
                )
        cond_dim = self._prompt_features([self.task.train_sample(0)]).shape[-1]
        shape = self.model.latent_shape(self.height, self.width)
        policy = NoisePolicy(
            shape, mode=c.policy, num_prompts=len(self.task.prompts), cond_dim=cond_dim,
            sigma_init=c.sigma_init, sigma_min=c.sigma_min,
        )
        self.value = ValueNet(cond_dim + 4, c.value_hidden).to(self.model.device)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=c.value_lr)
        return policy

    def _prompt_features(self, rows: list[Sample]) -> torch.Tensor:
        """Pooled prompt embedding ``[N, D]`` (the token-mean where the pipeline has no pooled one)."""
        e = self.model.encode([r.meta["prompt"] for r in rows], cfg=False)
        return (e.pooled if e.pooled is not None else e.embeds.mean(1)).float()

    def _policy_params(self, index: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engine.module(prompt_index=index.to(self.device), cond=cond.to(self.device))

    def _value_features(self, cond: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        mu, sigma = mu.detach().flatten(1).float(), sigma.detach().flatten(1).float()
        stats = torch.stack([mu.mean(1), mu.abs().mean(1), sigma.mean(1), sigma.std(1) if sigma.shape[1] > 1 else sigma.mean(1) * 0], 1)
        return torch.cat([cond.to(stats.device).float(), stats], 1)

    # -- sampling ----------------------------------------------------------------------------------
    def _index(self, rows: list[Sample]) -> torch.Tensor:
        return torch.tensor([self.prompt_index.get(r.meta["prompt"], 0) for r in rows])

    def _decode(self, rows: list[Sample], x_T: torch.Tensor, schedule) -> torch.Tensor:
        cond = self.condition(rows)
        out = []
        mb = self.micro_batch_size()
        for s in range(0, len(rows), mb):
            idx = list(range(s, min(s + mb, len(rows))))
            with self.engine.autocast():
                traj = self.decoder.sample(self.model.denoiser, cond.rows(idx), x_T[idx].to(self.device), schedule, stochastic=False)
            out.append(self.model.decode(traj.final))
        return torch.cat(out)

    def generate(self, samples, cond, *, eval_mode, generator):
        with torch.no_grad():
            mu, sigma = self._policy_params(self._index(samples), self._prompt_features(samples))
            x_T = NoisePolicy.sample(mu, sigma, generator)
        return self._decode(samples, x_T, self.eval_schedule if eval_mode else self.schedule)

    def rollout(self) -> tuple[NoiseBatch, dict[str, float]]:
        c: FindConfig = self.task.config
        t0 = time.perf_counter()
        rows, group_ids = self.draw_prompts()
        index, cond = self._index(rows), self._prompt_features(rows)
        with torch.no_grad():
            mu, sigma = self._policy_params(index, cond)
            x_T = NoisePolicy.sample(mu, sigma)
            logp_old = diag_gaussian_log_prob(x_T, mu, sigma)
            images = self._decode(rows, x_T, self.schedule)
        t1 = time.perf_counter()
        out = self.score(images, rows)
        rewards = out.rewards.float()
        metrics: dict[str, float] = {}
        if c.baseline == "value":
            feats = self._value_features(cond, mu, sigma)
            with torch.no_grad():
                v = self.value(feats).cpu()
            adv = rewards - v
            metrics["value_loss"] = self._fit_value(feats, rewards)
            metrics["value_mean"] = float(v.mean())
        elif c.baseline == "group":
            adv = self.advantages(rewards, group_ids, rows)
        else:
            adv = rewards.clone()
        t2 = time.perf_counter()
        batch = NoiseBatch(rows, index, cond.cpu(), x_T.cpu(), logp_old.cpu(), rewards, adv)
        metrics.update({
            "rollout_s": t1 - t0, "reward_s": t2 - t1, "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rows) > 1 else 0.0, "advantage_abs_mean": float(adv.abs().mean()),
            "sigma_mean": float(sigma.mean()), "mu_abs_mean": float(mu.abs().mean()),
        })
        metrics.update({f"reward/{k}": float(v.float().mean()) for k, v in out.components.items()})
        return batch, metrics

    def _fit_value(self, feats: torch.Tensor, rewards: torch.Tensor) -> float:
        """``value_steps`` MSE steps of the value net on this iteration's rewards; the last loss."""
        target = rewards.to(feats.device)
        loss = torch.zeros(())
        for _ in range(self.task.config.value_steps):
            loss = torch.nn.functional.mse_loss(self.value(feats), target)
            self.value_opt.zero_grad()
            loss.backward()
            self.value_opt.step()
        return float(loss.detach())

    # -- update ------------------------------------------------------------------------------------
    def update(self, batch: NoiseBatch, step: int) -> dict[str, float]:
        c: FindConfig = self.task.config
        a, t = self.cfg.algorithm, self.cfg.trainer
        reg_w = c.reg_weight * (min(1.0, (step + 1) / c.reg_warmup_steps) if c.reg_warmup_steps else 1.0)
        sums: dict[str, float] = {}
        n = len(batch.rows)
        n_mb = self.minibatches()
        count = 0
        for epoch in range(t.update_epochs):
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 101 + epoch)
            order = torch.randperm(n, generator=g)
            for mb in torch.tensor_split(order, n_mb):
                for part in torch.tensor_split(mb, self.micro_batches()):
                    micro = part if len(part) else order[:1]  # an empty slot runs with weight 0
                    mu, sigma = self._policy_params(batch.index[micro], batch.cond[micro])
                    logp = diag_gaussian_log_prob(batch.x_T[micro].to(self.device), mu, sigma)[:, None]
                    mask = torch.ones_like(logp, dtype=torch.bool)
                    loss_mat, lm = self.loss_fn(
                        logp, batch.logp_old[micro].to(self.device)[:, None], batch.advantages[micro].to(self.device), mask, **a.loss_options
                    )
                    pg = aggregate(loss_mat, mask, a.loss_agg, max_len=1)
                    reg = NoisePolicy.regulariser(mu, sigma).mean()
                    loss = pg + reg_w * reg
                    self.engine.backward(loss * (len(part) / len(mb)))
                    if len(part):
                        for k, v in {"pg_loss": float(pg.detach()), "reg": float(reg.detach()), "loss": float(loss.detach()), **lm}.items():
                            sums[k] = sums.get(k, 0.0) + float(v)
                        count += 1
                grad_norm, skipped = self.optimizer_step(step)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
        out = {k: v / max(1, count) for k, v in sums.items() if k != "grad_norm"}
        out["grad_norm"] = sums.get("grad_norm", 0.0) / (t.update_epochs * n_mb)
        out["reg_weight"] = reg_w
        return out

    # -- state -------------------------------------------------------------------------------------
    def save_extra(self, folder: Path) -> None:
        tensors = {f"value.{k}": v for k, v in self.value.state_dict().items()}
        for pid, st in self.value_opt.state_dict()["state"].items():
            tensors.update({f"opt.{pid}.{k}": torch.as_tensor(v) for k, v in st.items()})
        save_state_tensors(folder / "value.safetensors", tensors)

    def load_extra(self, folder: Path) -> None:
        tensors = load_state_tensors(folder / "value.safetensors", device=self.model.device)
        self.value.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("value.")})
        sd = self.value_opt.state_dict()
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v.cpu() if name == "step" else v
        sd["state"] = state
        self.value_opt.load_state_dict(sd)

    def load_final_model(self, model_dir: Path) -> None:
        """The noise policy of a finished run (``model/noise_policy.safetensors``)."""
        path = model_dir / "noise_policy.safetensors"
        if not path.is_file():
            raise ConfigError(f"'{model_dir}' has no noise_policy.safetensors (the model folder of a find run)")
        self.engine.module.load_state_dict(load_state_tensors(path, device=self.device))

    def save_final_model(self) -> None:
        """``model/noise_policy.safetensors`` (mu, sigma or the conditioning head) with a JSON
        description; the denoiser is unchanged (the pipeline of model.path)."""
        folder = self.run_dir / "model"

        def save(module: torch.nn.Module, f: Path, state: dict[str, torch.Tensor]) -> None:
            meta = {"mode": module.mode, "shape": ",".join(map(str, module.shape)), "pipeline": str(self.model.folder),
                    "prompts": "\n".join(p.text for p in self.task.prompts)}
            save_state_tensors(f / "noise_policy.safetensors", state, metadata=meta)

        self.engine.save_pretrained(folder, save_fn=save)


__all__ = ["FindTask", "FindTrainer", "FindConfig", "ValueNet"]
