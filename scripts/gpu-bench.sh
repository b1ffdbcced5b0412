#!/usr/bin/env bash
# The GPU figures of the README in one run (a ~0.8 B Llama with random weights, no download):
# mixed-expert batches k = 1…64 vs PEFT adapter_names and per-request set_adapter, eager vs
# compiled decode against the weight-read floor, token top-2 over 4/16/64 experts vs one LoRA.
# Usage: scripts/gpu-bench.sh [OUT_DIR]   (JSON per bench in OUT_DIR, default ./gpu-bench)
set -euo pipefail
out="${1:-gpu-bench}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
moerge bench serving --no-http --device cuda --dtype bfloat16 --hidden 2048 --layers 16 \
  --batch 64 --new-tokens 32 --ks 1,4,16,64 --repeats 3 --compile --json "$out/serving.json" --no-progress
moerge bench routing --device cuda --dtype bfloat16 --hidden 2048 --layers 16 \
  --experts 4,16,64 --batch 16 --seq 512 --repeats 5 --json "$out/routing.json" --no-progress
