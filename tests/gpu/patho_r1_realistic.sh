#!/usr/bin/env bash
# GPU check for the VLM-reasoning issue: `mmpo bench` on configs/patho_r1_grpo.yaml with a
# Qwen2.5-VL-3B-shaped model (random weights, built offline by mmpo.tiny), bf16, 448x448 images
# (256 vision tokens per prompt). Prints one JSON line: s/step and peak GPU MB per phase.
#   bash tests/gpu/patho_r1_realistic.sh [override ...]
# env: LM_LAYERS (36), VIS_LAYERS (32) (the real 3B), PREC (bf16), MAX_NEW (128), STEPS (3)
# Micro batches of 8 rows with activation checkpointing: with the whole 64-row minibatch in one
# micro batch (the recipe's default) the first step ran out of memory on an H200 (138 GB allocated,
# in a Qwen2.5-VL MLP forward: 64 rows of ~400 tokens plus 64 x 1024 image patches at once).
# Needs a CUDA machine with torch, transformers, peft, qwen-vl-utils and the project installed
# (`pip install -e .`); the demo data are built into $MMPO_CACHE on first use.
set -euo pipefail
LM_LAYERS=${LM_LAYERS:-36}
VIS_LAYERS=${VIS_LAYERS:-32}
PREC=${PREC:-bf16}
SIZES="{hidden_size: 2048, intermediate_size: 11008, num_hidden_layers: $LM_LAYERS, num_attention_heads: 16,"
SIZES="$SIZES num_key_value_heads: 2, model_vocab_size: 151936, tie_word_embeddings: true,"
SIZES="$SIZES mrope_section: [16, 24, 24], vision_depth: $VIS_LAYERS, vision_embed_dim: 1280, vision_num_heads: 16,"
SIZES="$SIZES vision_intermediate_size: 3420, max_pixels: 12845056}"
exec ${MMPO:-mmpo} bench configs/patho_r1_grpo.yaml "model.tiny=$SIZES" precision=$PREC \
  task.min_pixels=200704 task.max_pixels=200704 rollout.max_new_tokens=${MAX_NEW:-128} \
  trainer.micro_batch_size=${MICRO:-8} model.gradient_checkpointing=true \
  eval.num_samples=0 "$@" --steps ${STEPS:-3} --warmup 1
