#!/usr/bin/env bash
# One command for a session that has a GPU: run the GPU-only tests, then the benchmark suites, and write
# result JSON + report (markdown, plot) named after the device into benchmarks/results/.
#
#   bash benchmarks/run_gpu.sh [tests|grid|self|gate|train|all]   (default: all)
#
# Each part stays well inside a 10-minute command limit on an H100/H200; run them one by one if a single
# call must be shorter. Install first on a machine without network: pip install --no-deps --no-build-isolation -e .
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
case "$part" in tests|grid|self|gate|train|all) ;; *) echo "error: unknown part '$part' (tests|grid|self|gate|train|all)" >&2; exit 2 ;; esac
python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device')"
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
res=benchmarks/results
mkdir -p "$res"

run_suite() {  # name file
  local out="$res/$1_${dev}.json"
  python3 -m pytest "benchmarks/$2" --benchmark-only -q --benchmark-json "$out.tmp"
  mv "$out.tmp" "$out"
  python3 benchmarks/report.py "$out"
}

case "$part" in
  tests|all) python3 -m pytest tests -q -m gpu -p no:cacheprovider ;;&
  grid|all)  run_suite grid_attention test_bench_grid_attention.py ;;&
  self|all)  run_suite self_attention test_bench_self_attention.py ;;&
  gate|all)  run_suite residual_gate test_bench_residual_gate.py ;;&
  train|all) run_suite train_step test_bench_train_step.py ;;&
esac
