#!/usr/bin/env bash
# The GPU benchmark run as one prepared script: its default steps fit one 600 s command of a 15-minute lease.
#
#   bash benchmarks/run_gpu.sh [STEP ...]        # default: e2e_2b_b256 e2e_2b_b32 e2e_2b_b1; results in results/gpu/
#
# Steps (each one `python -m benchmarks` run, stopped after its time limit so that one slow step cannot eat the rest;
# the compiled path compiles per model and batch size, so each step keeps to a few cells and writes its own JSON):
#   e2e_2b_b256   captioning, Gemma-2B, bf16, batch 256: mobilenet_single vs the PaliGemma design, eager and compiled
#   e2e_2b_b32    the same at batch 32            (these three steps: the 12 cells that count, 510 s at most)
#   e2e_2b_b1     the same at batch 1
#   e2e_270m_b256 e2e_270m_b32 e2e_270m_b1   the same with Gemma 3 270M (a second command, as time allows)
#   qlora_2b      training: QLoRA (NF4 decoder, bnb) against bf16 LoRA, Gemma-2B shape, batch 8: peak GPU memory and
#                 steps/s (benchmarks/qlora.py; a second command: bash benchmarks/run_gpu.sh qlora_2b, 180 s at most)
#   e2e_rest      Gemma-2B, the other three variants and the baseline, batches 32/256 (not run by default)
#   fp32 bf16 bf16_b256 compile_b32 compile_b256   the earlier encoder/all runs (not run by default)
# After each step the results so far are packed into $ARCHIVE (default $RESULTS.tgz), so a stopped run keeps them.
# EXTRA is appended to every step: EXTRA="--quick --device cpu" is a dry run of the script in seconds, and then
# RESULTS defaults to outputs/benchmarks-quick/gpu (git-ignored): a dry run never replaces the committed results.
# PYTHON names the interpreter (default python).
set -uo pipefail

PYTHON=${PYTHON:-python}
if [[ " ${EXTRA:-} " == *" --quick "* ]]; then
    RESULTS=${RESULTS:-outputs/benchmarks-quick/gpu}
else
    RESULTS=${RESULTS:-results/gpu}
fi
ARCHIVE=${ARCHIVE:-$RESULTS.tgz}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

STEPS="e2e_2b_b256 e2e_2b_b32 e2e_2b_b1 qlora_2b e2e_270m_b256 e2e_270m_b32 e2e_270m_b1 e2e_rest fp32 bf16 bf16_b256 compile_b32 compile_b256"
E2E="captioning --dtype bf16 --paths eager compiled --caption-rounds 5"
PAIR="--models mobilenet_single paligemma_so400m"
declare -A LIMIT=([e2e_2b_b256]=220 [e2e_2b_b32]=160 [e2e_2b_b1]=130 [e2e_270m_b256]=180 [e2e_270m_b32]=140
    [e2e_270m_b1]=120 [e2e_rest]=300 [qlora_2b]=180
    [fp32]=150 [bf16]=300 [bf16_b256]=150 [compile_b32]=330 [compile_b256]=300)
declare -A ARGS=(
    [e2e_2b_b256]="$E2E --lm-size 2b $PAIR --caption-batch-sizes 256"
    [e2e_2b_b32]="$E2E --lm-size 2b $PAIR --caption-batch-sizes 32"
    [e2e_2b_b1]="$E2E --lm-size 2b $PAIR --caption-batch-sizes 1"
    [e2e_270m_b256]="$E2E --lm-size 270m $PAIR --caption-batch-sizes 256"
    [e2e_270m_b32]="$E2E --lm-size 270m $PAIR --caption-batch-sizes 32"
    [e2e_270m_b1]="$E2E --lm-size 270m $PAIR --caption-batch-sizes 1"
    [e2e_rest]="$E2E --lm-size 2b --models mobilenet_multi efficientnet_single efficientnet_multi paligemma_so400m \
--caption-batch-sizes 32 256"
    [qlora_2b]="--lm-size 2b --batch-size 8 --steps 10"
    [fp32]="encoders --dtype fp32 --batch-size 32"
    [bf16]="all --dtype bf16 --batch-size 32"
    [bf16_b256]="encoders --dtype bf16 --batch-size 256"
    [compile_b32]="encoders --dtype bf16 --compile --batch-size 32"
    [compile_b256]="encoders --dtype bf16 --compile --batch-size 256"
)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(e2e_2b_b256 e2e_2b_b32 e2e_2b_b1)
for step in "${steps[@]}"; do  # before any work: a typo must not cost a GPU lease
    if [ -z "${ARGS[$step]:-}" ]; then
        echo "run_gpu.sh: unknown step '$step'; expected any of: $STEPS" >&2
        exit 2
    fi
done
mkdir -p "$RESULTS"

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PYTHON" -c "import sys, torch, transformers, timm, peft; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'timm', timm.__version__, 'peft', peft.__version__)"
    nproc
} 2>&1 | tee "$RESULTS/machine.txt"

for step in "${steps[@]}"; do
    module=benchmarks
    [[ $step == qlora_* ]] && module=benchmarks.qlora
    echo "=== $step: python -m $module ${ARGS[$step]} (limit ${LIMIT[$step]} s)"
    start=$SECONDS
    # shellcheck disable=SC2086
    timeout -k 5 "${LIMIT[$step]}" "$PYTHON" -m $module ${ARGS[$step]} ${EXTRA:-} --output-dir "$RESULTS" --tag "gpu_$step" \
        2>&1 | tee "$RESULTS/gpu_$step.log"
    echo "=== $step: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$RESULTS/gpu_$step.log"
    tar czf "$ARCHIVE" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
done
