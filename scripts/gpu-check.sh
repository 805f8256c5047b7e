#!/usr/bin/env bash
# scripts/gpu-check.sh: llmkit's GPU suite and a CUDA run of the normal tests, in one go, under 10 minutes.
#
# Run from anywhere on a machine with an NVIDIA GPU:   bash scripts/gpu-check.sh
#
# What it does, each stage under a `timeout` (seconds; override with the variables named):
#   1. set-up: `make install` (a .venv in the repo: the Makefile's torch==2.13.0, then llmkit with its
#      extras); reused when it is already there. Not counted in the 10 minutes (a first install
#      downloads torch).
#   2. prints nvidia-smi, and torch's version, CUDA version and device; stops if torch sees no GPU;
#   3. the GPU suite:    LLMKIT_TEST_ACCELERATOR=cuda pytest -m gpu -x -q -p no:randomly tests/gpu
#                        (GPU_SUITE_TIMEOUT, default 210);
#   4. a CUDA subset of the normal suite, every single-process Trainer on the GPU:
#                        LLMKIT_TEST_ACCELERATOR=cuda pytest -q -n 4 -m "not slow" tests/callbacks tests/models
#                        (SUBSET_TIMEOUT, default 270; multi-process tests stay on CPU over gloo by design);
#   5. the benchmarks that take `--device`, with `--device cuda --quick` (BENCH_TIMEOUT in all, default 90).
#      For now every benchmark in benchmarks/ is CPU-only (none takes --device): the stage says so
#      and runs nothing; it picks them up by itself once they accept the flag;
#   6. a summary: each stage's result and wall time; the exit status is 1 if any stage failed or
#      ran out of time. Logs are written to outputs/gpu-check/ (ignored by git).
#
# Assumptions:
# - Linux x86-64 with an NVIDIA driver. `pip install torch==2.13.0` from the default index (PyPI)
#   gives a CUDA build there (PyPI's Linux x86-64 torch wheels bundle CUDA); where pip is
#   configured with another index or local wheels (this project's CI machines serve CPU builds),
#   install a CUDA build of torch into .venv first, or use LLMKIT_PYTHON below.
# - `make install` needs the package index. On a machine that cannot reach it (the device machines
#   lent in this workplace: no network; python3 there is Python 3.12 with a CUDA build of torch
#   2.11, lightning 2.6.6, torchmetrics 1.9, pytest, pytest-xdist, sacrebleu, transformers, but no
#   torchao, rapidfuzz, rouge-score, num2words, nltk or jsonargparse), set LLMKIT_PYTHON to an
#   interpreter that has torch with CUDA: the script then skips `make install` and puts src/ on
#   PYTHONPATH. The missing packages travel as wheels (see that machine's notes) and install first.
# - torchao's int4 CUDA kernels (the `int4-cuda-kernel` case of the QAT test) need the `mslk-cuda`
#   package; without it that case skips and says so.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

GPU_SUITE_TIMEOUT="${GPU_SUITE_TIMEOUT:-210}"
SUBSET_TIMEOUT="${SUBSET_TIMEOUT:-270}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-90}"
INSTALL_TIMEOUT="${INSTALL_TIMEOUT:-1200}"
LOGS="$ROOT/outputs/gpu-check"
mkdir -p "$LOGS"

declare -a SUMMARY=()
FAILED=0

# run_stage NAME SECONDS COMMAND...: run under `timeout`, log to $LOGS/NAME.log, record the result.
run_stage() {
    local name="$1" seconds="$2"
    shift 2
    echo
    echo "=== $name (at most ${seconds} s): $*"
    local start rc result
    start=$(date +%s)
    set +e
    timeout --kill-after=15 "$seconds" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    case "$rc" in
        0) result="passed" ;;
        124 | 137) result="TIMED OUT after ${seconds} s"; FAILED=1 ;;
        *) result="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    SUMMARY+=("$(printf '%-12s %-28s %5d s' "$name" "$result" "$(($(date +%s) - start))")")
}

# --- 1. set-up --------------------------------------------------------------------------------
if [[ -n "${LLMKIT_PYTHON:-}" ]]; then
    PYTHON="$LLMKIT_PYTHON"
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    echo "Using $PYTHON with src/ on PYTHONPATH (no make install)."
else
    timeout "$INSTALL_TIMEOUT" make install
    PYTHON="$ROOT/.venv/bin/python"
fi
missing=$("$PYTHON" - <<'EOF'
import importlib.util
needed = ["torch", "lightning", "torchmetrics", "torchao", "rapidfuzz", "regex", "jsonargparse", "pytest", "xdist",
          "sacrebleu", "rouge_score", "num2words", "sklearn", "hypothesis", "transformers"]
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
EOF
)
if [[ -n "$missing" ]]; then
    echo "Missing Python packages for $PYTHON: $missing" >&2
    exit 2
fi

# --- 2. the machine ---------------------------------------------------------------------------
echo
echo "=== the machine"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi || true
else
    echo "nvidia-smi not found"
fi
"$PYTHON" - <<'EOF'
import sys

import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: this is not a GPU machine, or torch is a CPU build (see the header)")
for index in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(index)
    print(f"cuda:{index} {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}")
EOF

export LLMKIT_TEST_ACCELERATOR=cuda
export PYTHONUNBUFFERED=1

# --- 3. the GPU suite -------------------------------------------------------------------------
run_stage gpu-suite "$GPU_SUITE_TIMEOUT" \
    "$PYTHON" -m pytest -m gpu -x -q -p no:randomly -rs --durations=10 tests/gpu

# --- 4. the normal suite's Trainers on CUDA ---------------------------------------------------
run_stage cuda-subset "$SUBSET_TIMEOUT" \
    "$PYTHON" -m pytest -q -n 4 -m "not slow" -p no:randomly --durations=10 tests/callbacks tests/models

# --- 5. benchmarks that take a device ---------------------------------------------------------
benches=()
for script in benchmarks/*.py; do
    [[ "$(basename "$script")" == _* ]] && continue
    if grep -q -- '"--device"' "$script"; then  # an argparse option of that name
        benches+=("$script")
    fi
done
if [[ ${#benches[@]} -eq 0 ]]; then
    echo
    echo "=== benchmarks: all CPU-only for now (none takes --device); nothing to run on the GPU."
    SUMMARY+=("$(printf '%-12s %-28s' benchmarks "none take --device yet")")
else
    bench_commands=()
    for script in "${benches[@]}"; do
        bench_commands+=("\"$PYTHON\" \"$script\" --device cuda --quick")
    done
    joined=$(printf '%s && ' "${bench_commands[@]}")
    run_stage benchmarks "$BENCH_TIMEOUT" bash -c "${joined% && }"
fi

# --- 6. summary -------------------------------------------------------------------------------
echo
echo "=== summary (logs in $LOGS)"
for line in "${SUMMARY[@]}"; do
    echo "$line"
done
exit "$FAILED"
