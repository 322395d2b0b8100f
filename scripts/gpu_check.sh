#!/usr/bin/env bash
# Every GPU measurement the docs and tests name, in one run (under 10 minutes on one large GPU),
# so that the first session with a CUDA machine yields every figure at once:
#   1. env      GPU, driver, torch/transformers/peft/bitsandbytes versions, flash-attn present?
#   2. memory   7B-shaped LoRA peak memory, 8-bit and 4-bit, cutoff 256 and 512 (random init, no hub;
#               tests/test_distributed.py::test_llama_7b_shaped_kbit_peak_gpu_memory)
#   3. speed-1b 1B-shaped tokens/s, peak memory and MFU: the alpaca-lora recipe vs ours vs token-budget rows;
#               ours compiled (--torch_compile auto is on with CUDA; compile_s and first_step_s reported) vs eager
#   4. speed-7b the same on a 7B shape (fewer steps)
#   5. flash    flash-attention 2 varlen on packed rows (1B shape), where flash-attn is installed
#   6. peers    TRL / LLaMA-Factory (tools/benchmark.py peers), where their venvs exist under WORK/venvs
#   7. liger    where liger-kernel is installed: speed-1b's "ours" ran Liger's fused loss (--loss_kernel auto);
#               the same run with the chunked loss head (--loss_kernel chunked), for tokens/s and peak memory
#   8. tests    pytest -m gpu (the other GPU-only tests; Liger's loss and gradients equal the chunked ones)
# Then WORK/gpu_check.json and WORK/gpu_check.md (tools/benchmark.py report). A step that fails or
# runs past its time budget is recorded as such and the next one runs.
#
#   bash scripts/gpu_check.sh [WORK] [--dry_run]     (WORK defaults to gpu-check/)
#   PYTHON   the interpreter (default: python)
# Without CUDA, or with --dry_run, it prints what it would measure and exits 0.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
WORK=gpu-check
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry_run | --dry-run) DRY_RUN=1 ;;
        -h | --help)
            sed -n '2,19p' "$0"
            exit 0
            ;;
        -*)
            echo "error: unknown option $arg (use --dry_run)" >&2
            exit 2
            ;;
        *) WORK=$arg ;;
    esac
done
if [[ $DRY_RUN == 0 ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA GPU here: dry run (what a CUDA machine would measure)"
    DRY_RUN=1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

STEPS="$WORK/steps.tsv"
if [[ $DRY_RUN == 0 ]]; then
    mkdir -p "$WORK"
    : >"$STEPS"
fi

# step NAME SECONDS COMMAND...: run it with a time budget, log to WORK/NAME.log, record the outcome.
step() {
    local name=$1 budget=$2
    shift 2
    if [[ $DRY_RUN == 1 ]]; then
        printf '%-9s (<= %4ss) %s\n' "$name" "$budget" "$*"
        return 0
    fi
    local start rc=0
    start=$(date +%s)
    echo "== $name (budget ${budget}s): $*"
    timeout "$budget" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
    local status=ok
    if [[ $rc == 124 ]]; then status=timeout; elif [[ $rc != 0 ]]; then status="failed($rc)"; fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - start))" >>"$STEPS"
    echo "   $status after $(($(date +%s) - start))s (log: $WORK/$name.log)"
}

BENCH=("$PYTHON" tools/benchmark.py)
step env 10 "${BENCH[@]}" env "$WORK"
step memory 200 env GPU_MEMORY_REPORT="$WORK/gpu_memory.json" "$PYTHON" -m pytest -m gpu -s -q -p no:cacheprovider \
    tests/test_distributed.py -k test_llama_7b_shaped_kbit_peak_gpu_memory
step speed-1b 90 "${BENCH[@]}" run "$WORK" --shape 1b --samples 400 --repeats 1 --configs recipe,eager,ours,tokens --out "$WORK/speed-1b.json"
step speed-7b 120 "${BENCH[@]}" run "$WORK" --shape 7b --samples 400 --max_steps 5 --configs recipe,ours,tokens --out "$WORK/speed-7b.json"
if [[ $DRY_RUN == 1 ]] || "$PYTHON" -c 'import flash_attn' 2>/dev/null; then
    step flash 35 "${BENCH[@]}" run "$WORK" --shape 1b --samples 400 --configs ours,tokens --out "$WORK/speed-1b-flash.json" \
        --attn_implementation flash_attention_2
fi
if [[ $DRY_RUN == 1 ]] || [[ -d "$WORK/venvs" ]]; then
    step peers 60 "${BENCH[@]}" peers "$WORK" --shape 1b --samples 400 --out "$WORK/peers-1b.json"
fi
if [[ $DRY_RUN == 1 ]] || "$PYTHON" -c 'import liger_kernel' 2>/dev/null; then
    step liger 30 "${BENCH[@]}" run "$WORK" --shape 1b --samples 400 --max_steps 10 --configs ours --out "$WORK/speed-1b-chunked.json" \
        --loss_kernel chunked
fi
step tests 45 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -k "not test_llama_7b_shaped_kbit_peak_gpu_memory"
step report 10 "${BENCH[@]}" report "$WORK"
if [[ $DRY_RUN == 0 ]]; then
    cat "$WORK/gpu_check.md"
fi
