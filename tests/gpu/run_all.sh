#!/usr/bin/env bash
# Everything a lent GPU should measure, in one run (issue 21). Run from the repository root:
#   bash tests/gpu/run_all.sh            # every check; results under $OUT (default gpu_results/)
#   bash tests/gpu/run_all.sh 1 2        # only checks 1 and 2 (e.g. to split the run across two 10-minute calls)
#
# Files it needs (all in the repository; nothing is downloaded, every model is built offline with
# random weights at its real dimensions):
#   configs/quickstart.yaml              1. the quickstart in bf16 (train 20 steps + bench)
#   configs/patho_r1_grpo.yaml           2. Qwen2.5-VL-3B-shaped Patho-R1 bench, ZeRO-3 + checkpointing
#   configs/deepspeed/zero3.json            (its DeepSpeed config; demo data are built into $MMPO_CACHE)
#   tests/gpu/patho_r1_realistic.sh         (the 3B shape overrides)
#   configs/vllm_text_demo.yaml          3. hf vs vLLM sampled tokens/s (needs the vLLM env: make vllm-env
#                                           VLLM_PACKAGES="vllm==<version>"; skipped without it)
#   mmpo/bench_trl.py, mmpo/bench_shapes.py  4. the update's model-FLOPs utilisation against the GPU's measured
#                                           bf16 matmul peak, mmpo and TRL side by side at Qwen2.5-0.5B and
#                                           Qwen2-VL-2B (LoRA) shapes (needs pip install -e '.[bench]')
#   tests/gpu/chunk_grpo_sd3.sh          5. diffusion: SD3.5-Medium-shaped Chunk-GRPO step over sampling
# Needs: a CUDA machine with the project installed (make install, or pip install -e '.[dev]').
# Each check runs under `timeout`; a failing check is logged and the next one runs. Checks 1-3 take about
# 6 minutes on an H200, 4-5 about 8 (most of it building the random real-shape weights on the CPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_results}
MMPO=${MMPO:-mmpo}
command -v "$MMPO" >/dev/null 2>&1 || MMPO=.venv/bin/mmpo
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
CHECKS=" ${*:-1 2 3 4 5} "
want() { [[ "$CHECKS" == *" $1 "* ]]; }

run() {  # run NAME TIMEOUT_S CMD...: stdout (JSON lines) to $OUT/NAME.jsonl, everything to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > >(tee "$OUT/$name.jsonl") 2> "$OUT/$name.log"
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}

python - <<'EOF' > "$OUT/device.json"
import json, torch
from mmpo.bench_shapes import matmul_peak_gflops
print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "peak_gflops": {d: round(matmul_peak_gflops(1, d), 1) for d in ("fp32", "bf16")}}))
EOF
cat "$OUT/device.json"

# 1. the quickstart in bf16: a short training run (held-out accuracy logged) and its bench
want 1 && run quickstart_bf16_train 150 "$MMPO" train configs/quickstart.yaml precision=bf16 trainer.max_steps=20 \
  trainer.eval_every=10 output_dir="$OUT/quickstart_bf16"
want 1 && run quickstart_bf16_bench 90 "$MMPO" bench configs/quickstart.yaml precision=bf16 --steps 5 --warmup 1

# 2. the 3B-shaped Patho-R1 bench under ZeRO-3 with gradient checkpointing (one process; the
#    memory estimate first, so its prediction sits beside the measured peak)
want 2 && run patho_r1_3b_estimate 60 "$MMPO" bench --estimate configs/patho_r1_grpo.yaml --json \
  deepspeed=configs/deepspeed/zero3.json model.gradient_checkpointing=true trainer.micro_batch_size=8
want 2 && run patho_r1_3b_zero3 300 env STEPS=2 MMPO="torchrun --nproc-per-node 1 -m mmpo" \
  bash tests/gpu/patho_r1_realistic.sh \
  deepspeed=configs/deepspeed/zero3.json

# 3. hf against vLLM: sampled tokens per second on the same prompts
if ! want 3; then
  :
elif [ -x "${MMPO_VLLM_PYTHON:-.venv-vllm/bin/python}" ]; then
  run engines_hf_vllm 200 "$MMPO" bench --engines hf,vllm configs/vllm_text_demo.yaml precision=bf16 \
    rollout.max_new_tokens=128 rollout.min_new_tokens=128 --steps 3 --warmup 1
else
  echo "== engines_hf_vllm: skipped (no vLLM environment; make vllm-env VLLM_PACKAGES=\"vllm==<version>\")" \
    | tee -a "$OUT/summary.txt"
  run engines_hf 120 "$MMPO" bench --engines hf configs/vllm_text_demo.yaml precision=bf16 \
    rollout.max_new_tokens=128 rollout.min_new_tokens=128 --steps 3 --warmup 1
fi

# 4. model-FLOPs utilisation of the update against the GPU's bf16 peak, mmpo and TRL side by side
want 4 && run mfu_vs_trl 360 "$MMPO" bench --against trl --settings text-0.5b,vlm-2b-lora --precision bf16 \
  --steps 3 --warmup 1 --wait-quiet 0

# 5. diffusion: an RL step over sampling its group at an SD3.5-Medium shape
want 5 && run chunk_grpo_sd3 180 env STEPS=2 bash tests/gpu/chunk_grpo_sd3.sh

echo "results in $OUT (summary.txt, one .jsonl and .log per check)"
exit $status
