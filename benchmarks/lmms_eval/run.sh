#!/usr/bin/env bash
# Score an lvit export with lmms-eval (--model llava_hf) on the tiny local tiny_pope task, on CPU, offline.
#
#   bash benchmarks/lmms_eval/run.sh [EXPORT_DIR] [OUTPUT_DIR]
#
# EXPORT_DIR: an lvit export (LlavaForConditionalGeneration folder); default /tmp/lmms-export/export-mistral-siglip
# OUTPUT_DIR: where lmms-eval writes results JSON and samples; default /tmp/lmms-out
# Needs the venv from README.md (LMMS_VENV, default /tmp/lmms). Builds the data if it is missing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EXPORT="${1:-/tmp/lmms-export/export-mistral-siglip}"
OUT="${2:-/tmp/lmms-out}"
VENV="${LMMS_VENV:-/tmp/lmms}"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

[ -f /tmp/lmms-data/tiny_pope/test.jsonl ] || "$VENV/bin/python" "$HERE/build_data.py"

cd "$HERE/../.."   # repo root, so that --include_path is relative to it
"$VENV/bin/python" -m lmms_eval eval \
  --model llava_hf \
  --model_args "pretrained=$EXPORT,device=cpu,device_map=cpu,dtype=float32" \
  --tasks tiny_pope \
  --include_path benchmarks/lmms_eval \
  --batch_size 1 \
  --limit 8 \
  --log_samples \
  --output_path "$OUT"
