#!/bin/bash
# `bench/gpu.py measure` on a GPU machine that has no package index and no raee-ops install: run from the
# repository root with `.gpu/ort.tar.xz` and `.gpu/<preset>.tar.xz` (from `bench/gpu.py prepare`) beside it, and a
# Python with numpy, onnx, tokenizers and pyarrow. onnxruntime-gpu comes from the archive; raee-ops from this tree,
# its folders laid out as the wheel installs them. Results land in bench/results/ (and in $OUT when it is set).
set -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import numpy, onnx, tokenizers, pyarrow" || exit 3
work=/tmp/raee-gpu
rm -rf "$work" && mkdir -p "$work/ort" "$work/pkg"
tar -xf .gpu/ort.tar.xz -C "$work/ort" || exit 4
cp -r raee_ops "$work/pkg/" && cp -r schemas "$work/pkg/raee_ops/schemas" && cp -r pipelines "$work/pkg/raee_ops/pipelines" \
  && cp -r onnx_export "$work/pkg/raee_ops/onnx_export" || exit 5
export PYTHONPATH="$work/ort:$work/pkg"
cd bench
status=0
for preset in ${PRESETS:-smollm2-135m gemma3-270m}; do
  rm -f "results/gpu-$preset.json"
  timeout "${PER_PRESET:-280}" python3 gpu.py measure --preset "$preset" --work "$work/$preset" || status=1
  if [ -n "${OUT:-}" ] && [ -f "results/gpu-$preset.json" ]; then cp "results/gpu-$preset.json" "$OUT/"; fi
done
exit $status
