#!/usr/bin/env bash
# One call on a lent GPU machine (docs/training.md, "On a lent GPU machine"): train a checkpoint with
# manifests/train_gpu.yaml and bring back what a later session needs, all under $OUT:
#   $OUT/realdgen-small-x4.safetensors   the checkpoint (exported at every phase end, so a run cut off
#                                          by the time limit still leaves the phases it finished)
#   $OUT/train.log, $OUT/logs/*.csv       the run's output and loss rows (evaluate.py --run-dir reads logs/)
#   $OUT/env.txt                          python, torch, GPU
# The machine's image has torch but no pydantic (pipelines/manifest.py needs it): carry its wheels in
# .whl/ (gitignored; `bash bench/gpu_session.sh --fetch-wheels` here writes them) with carry [".whl"].
# The run folder stays on the machine (/tmp/run_gpu): its state.pt (17 MB) is over what one returned
# file may be. Extra arguments go to pipelines/train.py (e.g. --set stage_c.steps=...).
#
#     bash bench/gpu_session.sh --fetch-wheels        # here, once: .whl/ for Python 3.12, x86_64
#     bash bench/gpu_session.sh                       # there (run tool, carry [".whl"], timeout_s 600)
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    pins=$(grep -iE '^(pydantic|pydantic-core|annotated-types|typing-inspection|typing-extensions)==' \
        requirements/lock-cpu.txt)
    # shellcheck disable=SC2086
    exec python3 -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
        --platform manylinux2014_x86_64 -d .whl $pins
fi

OUT=${OUT:?set OUT to the folder whose files come back}
PY=python3
TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-540}  # inside the call's 600 s, leaving time to copy the results
{
    $PY -c 'import sys, torch; print(sys.version); print("torch", torch.__version__)'
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    fi
} > "$OUT/env.txt"
if ! $PY -c 'import pydantic' 2>/dev/null; then
    if ! ls .whl/*.whl > /dev/null 2>&1; then
        echo "no pydantic here and no wheels in .whl/: run 'bash bench/gpu_session.sh --fetch-wheels' first" \
            "and carry .whl" | tee "$OUT/train.log"
        exit 2
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
rc=0
PYTHONUNBUFFERED=1 timeout "$TRAIN_LIMIT_S" $PY pipelines/train.py manifests/train_gpu.yaml \
    --set "output.checkpoint=$OUT/realdgen-small-x4.safetensors" --set output.run_dir=/tmp/run_gpu \
    "$@" 2>&1 | tee "$OUT/train.log" || rc=$?
mkdir -p "$OUT/logs"
cp /tmp/run_gpu/logs/*.csv "$OUT/logs/" 2>/dev/null
echo "train.py exit $rc (124: cut off at ${TRAIN_LIMIT_S} s)" | tee -a "$OUT/train.log"
exit "$rc"
