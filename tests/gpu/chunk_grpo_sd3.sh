#!/usr/bin/env bash
# GPU check for the diffusion issue: `mmpo bench` of configs/chunk_grpo.yaml on an SD3-shaped
# transformer at a realistic size (random weights, built offline by mmpo.tiny_diffusion), bf16.
# Prints one JSON line: s/step split into rollout (SDE sampling of the group + VAE decode),
# reward and update, the step as a multiple of sampling alone (step_over_rollout), peak GPU MB.
#   bash tests/gpu/chunk_grpo_sd3.sh [override ...]
# env: LAYERS (24: SD3.5-Medium has 24 blocks of width 1536 = 24 heads x 64), HIDDEN (1536),
#      HEADS (24), LATENT (64: a 64x64 latent, as a 512 px image under SD3's 8x VAE; the tiny VAE
#      is 4x, so the images are 256 px), STEPS (3), G (8), PROMPTS (2), MICRO (8)
# Text encoders stay tiny (their cost is once per prompt); the denoiser dominates.
set -euo pipefail
LAYERS=${LAYERS:-24}
HIDDEN=${HIDDEN:-1536}
HEADS=${HEADS:-24}
LATENT=${LATENT:-64}
SIZE=$((LATENT * 4))
exec ${MMPO:-mmpo} bench configs/chunk_grpo.yaml model.path=tiny:sd3 \
  "model.tiny={num_layers: $LAYERS, hidden: $HIDDEN, num_heads: $HEADS, sample_size: $LATENT}" precision=bf16 \
  task.sampling.height=$SIZE task.sampling.width=$SIZE task.sampling.guidance_scale=4.5 \
  rollout.group_size=${G:-8} rollout.prompts_per_step=${PROMPTS:-2} trainer.micro_batch_size=${MICRO:-8} \
  eval.num_samples=0 "$@" --steps ${STEPS:-3} --warmup 1
