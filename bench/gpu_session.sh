#!/usr/bin/env bash
# The GPU work of a session that is lent an H100 / H200 through the `device` tool, in stages that
# each fit one 10-minute call. Run from the repository root on the device machine:
#
#     bash bench/gpu_session.sh STAGE [STAGE ...]
#
# Stages (each one's log goes to $OUT/<stage>.log; bench/results/<device>/ is packed into
# $OUT/results.tar.gz at the end, so a call that runs out of time still brings back what it wrote):
#   tests      pytest -m gpu (bf16 / fp16 kernels at SD shapes, the engine on CUDA)
#   kernels    bench/kernels.py without the compile / flex providers (they compile per case)
#   compiled   bench/kernels.py, only ours + compile + flex, SD-1.5 batch 1 and 2
#   train      bench/train.py --device cuda --dtype bf16 (SD-1.5 512², batch 1 and 4)
#   serve      bench/serve.py --model sd15 (16 requests)
#
# The machine has torch and triton but not diffusers: carry its wheel. Once, here (a machine with
# pip access), in the repository root:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# then call the device tool with carry [".whl"] and command "bash bench/gpu_session.sh tests kernels".
# Back here, unpack results.tar.gz over the repository root and commit bench/results/<device>/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu-session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'triton',
triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
    python3 -c "import peft; print('peft', peft.__version__)" || echo "peft missing: its providers are skipped"
} 2>&1 | tee "$OUT/versions.log"

status=0
run() {  # run STAGE COMMAND...: log to $OUT/STAGE.log, keep going after a failure
    local stage=$1
    shift
    echo "== $stage: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$OUT/$stage.log"
    local rc=$?
    echo "== $stage: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

for stage in "$@"; do
    case "$stage" in
        tests) run tests python3 -m pytest -m gpu -q -p no:cacheprovider ;;
        kernels) run kernels python3 bench/kernels.py --exclude compile,flex --rep-ms 50 ;;
        compiled) run compiled python3 bench/kernels.py --providers ours,compile,flex --model sd15 --batch 1,2 ;;
        train) run train python3 bench/train.py --device cuda --dtype bf16 ;;
        serve) run serve python3 bench/serve.py --model sd15 --device cuda ;;
        *) echo "unknown stage $stage (tests, kernels, compiled, train, serve)"; status=1 ;;
    esac
done

if [ -d bench/results ]; then
    tar -czf "$OUT/results.tar.gz" --exclude='bench/results/cpu' bench/results
fi
exit $status
