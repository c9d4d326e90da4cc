#!/usr/bin/env bash
# The whole GPU check in one command, budgeted for 10 minutes on one GPU:
#   1. the test suite on the GPU (real Triton kernels, bf16 included), log in $DEST/pytest.log;
#   2. `fastpeft bench --suite gpu`: micro cases at M in {1, 8, 16, 512, 4096} x (4096x4096, 14336x4096,
#      4096x14336), r=16, bf16, fastpeft vs reference vs PEFT(+bitsandbytes); DoRA, IA3, NF4 dequant;
#      multi-LoRA with 64 adapters; train step, decode and multi-LoRA serving on a ~0.2B random Llama;
#      the measured roofline in every row. Jobs not started when the budget runs out are listed as skipped.
# Usage: bash bench/gpu_suite.sh [DEST]   (DEST defaults to $OUT, else bench/results/<date>-<gpu>)
# Then commit DEST under bench/results/ (results.json, table.txt, *.png, pytest.log).
set -uo pipefail
cd "$(dirname "$0")/.."

TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-570}   # leaves ~30 s of the 10 minutes for start-up and writing
PYTEST_BUDGET_S=${PYTEST_BUDGET_S:-240}
start=$SECONDS

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: no CUDA device visible to torch; this script is for a GPU machine" >&2
    exit 2
fi
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
DEST=${1:-${OUT:-bench/results/$(date -u +%Y%m%d-%H%M)-$gpu}}
mkdir -p "$DEST"
echo "gpu_suite: $gpu -> $DEST"

# Real kernels on the GPU: no interpreter, default backend (Triton on CUDA tensors).
unset TRITON_INTERPRET FASTPEFT_BACKEND
timeout "$PYTEST_BUDGET_S" python -m pytest -q tests 2>&1 | tee "$DEST/pytest.log" | tail -n 25
pytest_status=${PIPESTATUS[0]}
echo "pytest exit status: $pytest_status (124 = stopped at ${PYTEST_BUDGET_S} s)" | tee -a "$DEST/pytest.log"

bench_budget=$(( TOTAL_BUDGET_S - (SECONDS - start) - 30 ))
(( bench_budget < 60 )) && bench_budget=60
python -m fastpeft.bench --suite gpu --out "$DEST" --time-budget "$bench_budget"
bench_status=$?

echo "gpu_suite: pytest $pytest_status, bench $bench_status, $(( SECONDS - start )) s in all; results in $DEST"
(( pytest_status == 0 && bench_status == 0 ))
