#!/usr/bin/env bash
# The GPU work of a session lent an H100 / H200 through the `device` tool: 15 device-minutes in
# all, each call ≤ 10 minutes, 1-2 of them spent starting the machine. Two calls at most:
#
#     bash bench/gpu_session.sh main     # ≤ 9.5 min: the numbers that matter most, first
#     bash bench/gpu_session.sh extra    # optional second call: train + serve + a profiled train step
#     bash bench/gpu_session.sh main extra   # both in one call: on an H200 main took 222 s and extra
#                                            # (without trainprof) 246 s, inside the 570 s budget
#
# main, in order, each stage under its own time limit so the call ends by BUDGET_S (570 s):
#   install  carried wheels (.whl/, diffusers among them) into $SITE, the project editable
#   aot      bench/aot_sm90.py --jobs 16: every kernel compiled in parallel into the shared
#            Triton cache (same keys as the real launches: the target is sm_90 both ways) and
#            the machine's own resource table (its Triton, its ptxas)
#   kernels  pytest -n 8 --timeout 120 tests/test_kernels_*.py: every kernel test, compiled: the tiny odd
#            shapes CI runs under the interpreter and the SD-sized ones marked gpu
#   bench    the kernel benchmarks cut: batch 2 and 8, no compile / flex / xformers providers,
#            --rep-ms 20, one script per subject (bench/regional.py / lora_kv.py / ewa.py,
#            75 / 60 / 40 s); every op, and the peft /
#            SDPA / per-region baselines
#   engine   pytest -m gpu (the engine's end-to-end tests on CUDA), kernels' tests excluded
# extra: train (bench/train.py, SD-1.5 bf16, batch 1 and 4, 10 steps), serve (bench/serve.py sd15),
#        trainprof (bench/train.py --profile, batch 1, 5 steps: where a training step's time goes,
#        profile-b1-<provider>.txt per provider in bench/results/<device>/profile/).
#
# $OUT gets at most 8 files, all top level, rewritten after EACH stage (a call killed at its
# limit still brings back every finished stage): versions.log, summary.txt, aot_sm90.json,
# <stage>.log per stage run, results.tar.gz (bench/results/<device>/ so far). A stage that fails,
# times out or cannot even collect its tests is logged and the next one runs. Without CUDA
# (a dry run on a CPU) the test stages only collect their tests (timing the collection), the
# other stages are skipped and say so, and the files are written all the same.
#
# Carry diffusers as a wheel (the machine has torch, triton, peft, transformers but no diffusers,
# and reaches no registry). Once, here, in the repository root (.whl/ is git-ignored):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# then call the device tool with carry [".whl"], timeout_s 600 and command
#     "bash bench/gpu_session.sh main"
# Back here, unpack results.tar.gz over the repository root and commit bench/results/<device>/.
#
# Environment: OUT (default out/gpu-session), PY (default python3), SITE (default /tmp/site),
# BUDGET_S (default 570), TRITON_CACHE_DIR (default /tmp/triton-cache).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu-session}"
PY="${PY:-python3}"
SITE="${SITE:-/tmp/site}"
BUDGET_S="${BUDGET_S:-570}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
status=0

note() { echo "$*" | tee -a "$SUMMARY"; }

pack() {  # bench/results/ (without the CPU folders) into $OUT/results.tar.gz, after every stage
    local dirs
    dirs=$(find bench/results -mindepth 1 -maxdepth 1 -type d ! -name cpu ! -name 'cpu-*' ! -name aot_sm90 2>/dev/null | sort)
    if [ -n "$dirs" ]; then
        # shellcheck disable=SC2086
        tar -czf "$OUT/results.tar.gz.tmp" $dirs && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
    fi
}

left() { echo $((BUDGET_S - SECONDS)); }

stage() {  # stage NAME LIMIT_S COMMAND...: log to $OUT/NAME.log, bounded by LIMIT_S and the budget
    local name=$1 limit=$2
    shift 2
    local room
    room=$(($(left) - 5))
    if [ "$room" -lt 20 ]; then
        note "== $name: skipped, ${room}s left of the ${BUDGET_S}s budget"
        return
    fi
    [ "$limit" -gt "$room" ] && limit=$room
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 15 "$OUT/$name.log"
    case $rc in
        0) note "== $name: ok after $((SECONDS - t0)) s" ;;
        124 | 137) note "== $name: TIMED OUT after $((SECONDS - t0)) s (limit ${limit}s)"; status=1 ;;
        *) note "== $name: exit $rc after $((SECONDS - t0)) s"; status=1 ;;
    esac
    pack
}

install() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || return 1
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if "$PY" -c "import sys, lifelong_engine.kernels as k; sys.exit(not k.__file__.startswith('$PWD/'))" 2>/dev/null; then
        echo "lifelong_engine already installed from this checkout"
    else
        "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || return 1
    fi
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
        "$PY" - <<'EOF'
import importlib
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("torch", "triton", "diffusers", "transformers", "peft", "xdist", "pytest_timeout"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except Exception as e:  # report, do not stop: each stage says what it lacks
        print(name, "MISSING:", type(e).__name__, e)
EOF
    } >"$OUT/versions.log" 2>&1
    cat "$OUT/versions.log"
}

CUDA=""  # asked once, after the install (importing torch takes seconds)
has_cuda() {
    if [ -z "$CUDA" ]; then
        CUDA=no
        "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && CUDA=yes
    fi
    [ "$CUDA" = yes ]
}

gpu_stage() {  # like stage, but skipped (its log says so) without CUDA
    if has_cuda; then
        stage "$@"
    else
        echo "skipped: no CUDA device (dry run)" >"$OUT/$1.log"
        note "== $1: skipped, no CUDA"
    fi
}

tests_stage() {  # tests_stage NAME LIMIT_S WORKERS MARK PYTEST-ARGS...: tests on CUDA (MARK "" for all, else a -m
    # expression), one line per test so that a stage cut at its limit still says what passed; without CUDA,
    # collect them only
    local name=$1 limit=$2 workers=$3 mark=$4
    shift 4
    local base=("$PY" -m pytest -v -p no:cacheprovider --continue-on-collection-errors -rfE)
    [ -n "$mark" ] && base+=(-m "$mark")
    if has_cuda; then
        stage "$name" "$limit" "${base[@]}" -n "$workers" --timeout 120 "$@"
    else
        stage "$name" "$limit" "${base[@]}" --collect-only "$@"
    fi
}

# The cut kernel benchmarks, one process (script) per subject, each with its share of the stage's time so
# that a slow subject cannot starve the others (results are written after every record).
export BENCH_CUT="--batch 2,8 --exclude compile,flex,xformers --rep-ms 20" PY
bench_cut() {
    local rc=0
    timeout 75 "$PY" bench/regional.py $BENCH_CUT || rc=1
    timeout 60 "$PY" bench/lora_kv.py $BENCH_CUT || rc=1
    timeout 40 "$PY" bench/ewa.py $BENCH_CUT || rc=1
    return $rc
}

run_main() {
    gpu_stage aot 60 "$PY" bench/aot_sm90.py --jobs 16 --cache-dir "$TRITON_CACHE_DIR" --json "$OUT/aot_sm90.json"
    tests_stage kernels 180 8 "" tests/test_kernels_*.py
    gpu_stage bench 180 bash -c "$(declare -f bench_cut); bench_cut"
    tests_stage engine 120 4 gpu tests --ignore-glob='tests/test_kernels_*'
}

run_extra() {
    gpu_stage train 300 "$PY" bench/train.py --device cuda --dtype bf16 --batch 1,4 --steps 10
    gpu_stage serve 200 "$PY" bench/serve.py --model sd15 --device cuda
    gpu_stage trainprof 120 "$PY" bench/train.py --device cuda --dtype bf16 --batch 1 --steps 5 --profile
}

: >"$SUMMARY"
note "gpu_session.sh $* on $(hostname) at $(date -u +%FT%TZ), budget ${BUDGET_S}s"
t0=$SECONDS
if install >"$OUT/install.log" 2>&1; then
    note "== install: ok after $((SECONDS - t0)) s"
    rm -f "$OUT/install.log"
else
    note "== install: FAILED after $((SECONDS - t0)) s (see install.log)"
    exit 1
fi
for what in "${@:-main}"; do
    case "$what" in
        main) run_main ;;
        extra) run_extra ;;
        *) note "unknown part $what (main, extra)"; status=1 ;;
    esac
done
pack
note "done after ${SECONDS}s, status $status"
exit $status
