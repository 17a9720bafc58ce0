#!/usr/bin/env bash
# One lent-GPU command per plan, each within an 8-minute time box, each writing at most 7 files (docs/gpu.md).
#
#   python benchmarks/gpu_wheel.py build        # here, first: .gpu/attnfast-*.whl and its manifest (carry .gpu)
#   bash benchmarks/gpu_run.sh headline         # there: correctness at real shapes, then every goal of issue 19
#   bash benchmarks/gpu_run.sh rest             # there, in a later lease: the other suites, by value
#   bash benchmarks/gpu_run.sh --dry-run PLAN   # here: the same run on a fake CPU device (what the tests run)
#
# Environment:
#   OUT              the result folder (the device tool sets it; default benchmarks/results/gpu-PLAN, and a
#                    new /tmp folder for --dry-run)
#   PYTHON           the interpreter (default /opt/torch/.venv/bin/python3 where it exists, else python3)
#   GPU_RUN_TOTAL_S  the time box in seconds (default 470; the command ends by GPU_RUN_TOTAL_S + 5)
#   GPU_WHEEL_DIR    where the wheel and its manifest are (default .gpu)
#
# Steps: (1) `pip install --no-deps --no-index --target TMP .gpu/attnfast-*.whl` (needs nothing but pip; a
# source install would need setuptools and wheel there) and PYTHONPATH=TMP; skipped by --dry-run, which
# uses the attnfast already installed here. (2) `python -P benchmarks/gpu_bench.py run PLAN --out $OUT`,
# output tee'd to $OUT/PLAN_run.log. gpu_bench first checks that the attnfast it imports is this
# checkout's code, byte for byte (gpu_wheel.verify), and measures nothing otherwise (exit 4); it gets
# the time box minus the install minus 15 s as its deadline and `timeout` interrupts it 10 s after
# that (SIGINT: it writes what it has), then kills it 10 s later.
#
# Files in $OUT (at most 7, each rewritten as the run goes): PLAN.json, PLAN.md, PLAN_run.log,
# PLAN_tests.log, PLAN_tests.jsonl, and for headline PLAN_smoke.json.
# Exit status: gpu_bench's (0 all passed, 1 a correctness failure or a case error, 3 no CUDA device,
# 4 install check failed, 130 interrupted at the time box), 2 bad usage.
#
# Estimated time box per plan (`python benchmarks/gpu_bench.py estimate`; a test keeps these lines current):
# headline: 17 cases in 6 workers; estimate 312 s <= 480 s = startup 25 + prepare 184 (correctness 170, longest worker 184, budget 200) + timing 93 + finalize 10
# rest: 32 cases in 6 workers; estimate 383 s <= 480 s = startup 25 + prepare 220 (correctness 220, longest worker 196, budget 230) + timing 128 + finalize 10
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
repo=$(pwd)
die() { echo "gpu_run.sh: error: $1" >&2; exit "${2:-2}"; }

dry=0
plan=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --dry-run) dry=1 ;;
    headline|rest) [ -z "$plan" ] || die "one plan per command (got '$plan' and '$1')"; plan=$1 ;;
    *) die "unknown plan or option '$1' (plans: headline, rest; options: --dry-run, --help)" ;;
  esac
  shift
done
[ -n "$plan" ] || die "name a plan: headline or rest"

if [ -z "${PYTHON:-}" ]; then
  if [ -x /opt/torch/.venv/bin/python3 ]; then PYTHON=/opt/torch/.venv/bin/python3; else PYTHON=python3; fi
fi
total=${GPU_RUN_TOTAL_S:-470}
[[ "$total" =~ ^[0-9]+$ ]] && [ "$total" -ge 120 ] || die "GPU_RUN_TOTAL_S must be an integer >= 120; got '$total'"
if [ -n "${OUT:-}" ]; then out=$OUT
elif [ "$dry" = 1 ]; then out=$(mktemp -d /tmp/attnfast-gpu-dry.XXXXXX)  # never into the tracked results
else out=benchmarks/results/gpu-$plan; fi
case "$out" in /*) ;; *) out="$repo/$out" ;; esac
mkdir -p "$out" || die "cannot create the result folder $out"
start=$(date +%s)
export PYTHONUNBUFFERED=1

if [ "$dry" = 0 ]; then
  shopt -s nullglob
  wheel_dir=${GPU_WHEEL_DIR:-$repo/.gpu}
  wheels=("$wheel_dir"/attnfast-*.whl)
  shopt -u nullglob
  [ ${#wheels[@]} -eq 1 ] || die "expected one wheel in $wheel_dir (got ${#wheels[@]}): run 'python benchmarks/gpu_wheel.py build' here and carry .gpu"
  site=$(mktemp -d /tmp/attnfast-site.XXXXXX)
  trap 'rm -rf "$site"' EXIT
  echo "+ $PYTHON -m pip install --no-deps --no-index --no-compile --target $site ${wheels[0]#"$repo"/}"
  "$PYTHON" -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check --target "$site" \
    "${wheels[0]}" || die "installing ${wheels[0]} failed" 4
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

left=$(( total - ($(date +%s) - start) ))
deadline=$(( left - 15 ))
[ "$deadline" -ge 60 ] || die "only ${left} s left of the ${total} s time box after the install" 4
args=(run "$plan" --out "$out" --deadline-s "$deadline")
[ "$dry" = 1 ] && args+=(--dry-run)
echo "+ $PYTHON -P benchmarks/gpu_bench.py ${args[*]}  (time box ${total} s, $(( $(date +%s) - start )) s used)"
timeout --signal=INT --kill-after=10 "$(( deadline + 10 ))" "$PYTHON" -P benchmarks/gpu_bench.py "${args[@]}" 2>&1 \
  | tee "$out/${plan}_run.log"
exit "${PIPESTATUS[0]}"
