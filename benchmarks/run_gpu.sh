#!/usr/bin/env bash
# The GPU session in parts that each fit one 10-minute command (a lent H100/H200 gives ~30 minutes in all).
#
#   bash benchmarks/run_gpu.sh [PART ...] [-- EXTRA PYTEST ARGS]          (no PART: all)
#   bash benchmarks/run_gpu.sh --dry-run PART ...     # print what would run; installs and runs nothing
#
# PART: smoke | tests | grid | self | gate | cbam | train | all (all = every part in this order), or
#       install (install and check only; every other part does it first, once, and needs a CUDA device).
# Environment:
#   RESULTS_DIR   where results go (default benchmarks/results; on a lent machine: RESULTS_DIR=$OUT)
#   PART_TIMEOUT  seconds one part may run before it is interrupted (default 470: under 8 minutes)
#   PYTHON        the interpreter (default python3)
#   TEST_WORKERS  pytest-xdist workers for the tests part (default 4; 0 = serial)
#   SKIP_INSTALL=1  use the attnfast already installed (still checked as below)
#
# Install: `pip install --no-deps --no-build-isolation --no-index .` (a regular install: no network, no
# editable mapping to lose; it replaces an editable attnfast in that environment). Then, from an empty
# temporary folder, `import attnfast.kernels` must resolve into site-packages, else the script stops.
# Every Python command after the install runs with -P (no current folder on sys.path), so the checkout's
# attnfast/, which has no kernels/ inside, can never shadow the installed package.
#
# Each part writes as it goes, under RESULTS_DIR, named after the device (<dev>):
#   smoke: gpu_smoke_<dev>.json, rewritten after every case (benchmarks/gpu_smoke.py).
#   tests: tests_<dev>.jsonl (one line per finished test), tests_<dev>.log, tests_<dev>.xml (JUnit, at the end).
#   grid/self/gate/cbam/train: <suite>_<dev>.jsonl (one line per finished benchmark, pytest-benchmark's
#     record), <suite>_<dev>.json (pytest-benchmark's JSON at the end; rebuilt from the .jsonl and marked
#     partial when the part was cut short), then <suite>_<dev>.md/.png (benchmarks/report.py).
# A part past PART_TIMEOUT gets SIGINT (pytest ends the session and writes what it has), SIGKILL 30 s later.
#
# Estimated time per part on one H100. Case counts are read from the suites' parametrization; the times
# are estimates from the shapes, not measurements (no attnfast kernel has run on a GPU yet), and the part
# prints its collected count before it starts.
#   smoke  6 cases (grid x2, self-attention x2, gate, CBAM when present) x 3 dtypes = 18 fwd+bwd checks,
#          ~1-3 s each, mostly Triton JIT compiles, + ~10 s start-up  => ~1 min; hard stop: no case starts
#          after 100 s (--budget-s), so the part ends under 2 min.
#   tests  ~650 tests on CUDA (648 at this writing: tests/gpu's 64 real-shape cases + the ops/nn matrix;
#          count: ATTNFAST_TEST_FAKE_CUDA=1 pytest --collect-only tests/gpu tests/ops tests/nn, minus skips):
#          ~150 Triton specializations (a guess) x ~1.5 s compile / 4 workers ~ 1 min, 4 torch.compile tests x ~20 s,
#          648 x ~0.2 s run / 4 workers ~ 0.5 min, 64 real-shape cases x ~2 s / 4 ~ 0.5 min  => ~3-4 min.
#   grid   4 blocks x 3 batches x 2 dtypes x 3 providers x 3 modes = 216 benchmarks x ~0.15 s (23 calls of
#          0.1-5 ms + bookkeeping) ~ 0.5 min, + torch.compile: 2 modules x 2 dtypes x ~2 shapes x ~25 s
#          ~ 3.5 min, + ~12 Triton compiles x ~3 s  => ~4.5 min.
#   self   4 sizes x 1 dtype x 5 providers (eager, sdpa_default, sdpa_flash_padded, chunked, fused) x 3
#          modes = 60 benchmarks (eager at 256x256 skipped on OOM) x ~2 s (23 calls, up to ~0.7 s for the
#          chunked path at 256x256)  => ~2-3 min.
#   gate   3 shapes x 2 dtypes x 3 providers x 3 modes = 54 benchmarks x ~0.1 s, + torch.compile 2 dtypes
#          x ~2 shapes x ~15 s  => ~1 min.
#   cbam   benchmarks/test_bench_cbam.py (skipped with a message where it does not exist): 8 shapes (B 32/64
#          x 4 ResNet-50 stages) x 2 dtypes x 3 providers x 3 modes = 144 benchmarks x ~0.2 s ~ 0.5 min,
#          + torch.compile: 4 channel counts x 2 dtypes (dynamic after the 2nd batch) ~ 8-16 x ~20 s
#          ~ 3-5 min, + 2 ResNet-50-CBAM train steps ~ 0.5 min  => ~4-6 min.
#   train  4 cases (AttnVGG 224/512, RAN-56 224, ResNet-50-CBAM 224) x 2 amp x 2 attentions = 16 benchmarks
#          x (~20 steps of largest-batch search ~10 s + 23 timed steps ~5 s)  => ~4-5 min.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

PARTS_ALL=(smoke tests grid self gate cbam train)
usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}
die() { echo "run_gpu.sh: error: $1" >&2; exit "${2:-2}"; }

dry_run=0
parts=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -n|--dry-run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    all) parts+=("${PARTS_ALL[@]}") ;;
    install|smoke|tests|grid|self|gate|cbam|train) parts+=("$1") ;;
    *) die "unknown part or option '$1' (parts: ${PARTS_ALL[*]} all install; options: --dry-run, --help, -- PYTEST ARGS)" ;;
  esac
  shift
done
[ ${#parts[@]} -gt 0 ] || parts=("${PARTS_ALL[@]}")

PY=${PYTHON:-python3}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
PART_TIMEOUT=${PART_TIMEOUT:-470}
TEST_WORKERS=${TEST_WORKERS:-4}
[[ "$PART_TIMEOUT" =~ ^[0-9]+$ ]] && [ "$PART_TIMEOUT" -gt 0 ] || die "PART_TIMEOUT must be a positive integer (seconds); got '$PART_TIMEOUT'"
[[ "$TEST_WORKERS" =~ ^[0-9]+$ ]] || die "TEST_WORKERS must be a non-negative integer; got '$TEST_WORKERS'"
case "$RESULTS_DIR" in /*) ;; *) RESULTS_DIR="$repo/$RESULTS_DIR" ;; esac
export RESULTS_DIR
export PYTHONUNBUFFERED=1
export PYTHONPATH="$repo/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # the progress plugin (-p gpu_progress)

run() {  # print, then run unless --dry-run
  echo "+ $*"
  [ "$dry_run" = 1 ] || "$@"
}

timed() {  # the part's time limit: SIGINT first (pytest writes its reports), SIGKILL 30 s later
  run timeout --signal=INT --kill-after=30 "$PART_TIMEOUT" "$@"
}

dev=""
need_cuda() {  # once, before the first part that runs on the GPU: the device's name for the result files
  [ -z "$dev" ] || return 0
  if [ "$dry_run" = 1 ]; then dev=DEVICE; return 0; fi
  "$PY" -P -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || die "no CUDA device visible to $PY (torch.cuda.is_available() is False)" 3
  dev=$("$PY" -P -c "import re, torch; print(re.sub(r'[^A-Za-z0-9.-]+', '_', torch.cuda.get_device_name()).strip('_'))")
}
mkdir -p "$RESULTS_DIR"

install() {
  if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    run rm -rf "$repo/build"  # setuptools' in-tree build folder: a stale copy would ship deleted files
    run "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --no-cache-dir "$repo"
    run rm -rf "$repo/build"
  fi
  local probe
  probe=$(mktemp -d)
  echo "+ (cd $probe && $PY -P -c 'import attnfast.kernels ...')"
  [ "$dry_run" = 1 ] && { rmdir "$probe"; return 0; }
  (cd "$probe" && "$PY" -P - "$repo" <<'EOF'
import os, site, sys, sysconfig
repo = os.path.realpath(sys.argv[1])
import attnfast, attnfast.kernels
where = os.path.realpath(os.path.dirname(attnfast.kernels.__file__))
sites = {os.path.realpath(p) for p in site.getsitepackages() + [site.getusersitepackages(),
         sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]}
ok = any(where.startswith(s + os.sep) for s in sites) and not where.startswith(repo + os.sep)
print(f"attnfast {getattr(attnfast, '__version__', '?')}: attnfast.kernels from {where}")
if not ok:
    sys.exit(f"run_gpu.sh: error: attnfast.kernels resolves to {where}, not into site-packages {sorted(sites)}: "
             "the install is not the regular one this script needs")
EOF
  ) || { rm -rf "$probe"; die "import attnfast.kernels check failed (see above)" 4; }
  rm -rf "$probe"
}

suite() {  # name file: one pytest-benchmark suite, results as it goes + report
  local name=$1 file=$2
  local out="$RESULTS_DIR/${name}_${dev}"
  if [ ! -f "benchmarks/$file" ]; then
    echo "run_gpu.sh: part '$name' skipped: benchmarks/$file does not exist in this checkout" >&2
    return 0
  fi
  [ "$dry_run" = 1 ] || rm -f "$out.jsonl" "$out.json"
  [ "$dry_run" = 1 ] || { "$PY" -P -m pytest "benchmarks/$file" --benchmark-only -p no:cacheprovider --collect-only \
    -q ${extra[@]+"${extra[@]}"} 2>&1 | tail -1; } || true
  local rc=0
  timed "$PY" -P -m pytest "benchmarks/$file" --benchmark-only -q -p no:cacheprovider -p gpu_progress \
    --progress-jsonl "$out.jsonl" --benchmark-json "$out.json" ${extra[@]+"${extra[@]}"} || rc=$?
  [ "$dry_run" = 1 ] && return 0
  if [ ! -s "$out.json" ] && [ -s "$out.jsonl" ]; then
    echo "run_gpu.sh: $name did not finish (exit $rc): $out.json rebuilt from $out.jsonl (partial)" >&2
    "$PY" -P benchmarks/gpu_progress.py "$out.jsonl" "$out.json"
  fi
  [ -s "$out.json" ] && "$PY" -P benchmarks/report.py "$out.json"
  return "$rc"
}

tests_part() {
  local out="$RESULTS_DIR/tests_${dev}"
  local par=()
  if [ "$TEST_WORKERS" -gt 0 ] && "$PY" -P -c "import xdist" 2>/dev/null; then
    par=(-n "$TEST_WORKERS")
  fi
  [ "$dry_run" = 1 ] || rm -f "$out.jsonl"
  # tests/gpu first: the real shapes are what a short lease must not miss.
  if [ "$dry_run" = 1 ]; then
    timed "$PY" -P -m pytest tests/gpu tests/ops tests/nn -q -rfEs -p no:cacheprovider -p gpu_progress \
      --progress-jsonl "$out.jsonl" --junitxml "$out.xml" ${par[@]+"${par[@]}"} ${extra[@]+"${extra[@]}"}
    return 0
  fi
  set +e
  timed "$PY" -P -m pytest tests/gpu tests/ops tests/nn -q -rfEs -p no:cacheprovider -p gpu_progress \
    --progress-jsonl "$out.jsonl" --junitxml "$out.xml" ${par[@]+"${par[@]}"} ${extra[@]+"${extra[@]}"} \
    2>&1 | tee "$out.log"
  local rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

status=0
for part in "${parts[@]}"; do
  echo "=== $part ($(date -u +%H:%M:%S) UTC, results in $RESULTS_DIR) ==="
  [ "$part" = install ] || need_cuda
  if [ -z "${installed:-}" ]; then install; installed=1; fi
  rc=0
  case "$part" in
    install) ;;
    smoke) timed "$PY" -P benchmarks/gpu_smoke.py --out-dir "$RESULTS_DIR" || rc=$? ;;
    tests) tests_part || rc=$? ;;
    grid)  suite grid_attention test_bench_grid_attention.py || rc=$? ;;
    self)  suite self_attention test_bench_self_attention.py || rc=$? ;;
    gate)  suite residual_gate test_bench_residual_gate.py || rc=$? ;;
    cbam)  suite cbam test_bench_cbam.py || rc=$? ;;
    train) suite train_step test_bench_train_step.py || rc=$? ;;
  esac
  [ "$rc" = 0 ] || { echo "run_gpu.sh: part '$part' exited $rc" >&2; status=1; }
done
exit "$status"
