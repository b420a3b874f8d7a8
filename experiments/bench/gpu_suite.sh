#!/usr/bin/env bash
# One-shot GPU check: the GPU-only kernel tests, FSDP2 on NCCL, the kernel benchmark (APOLLO's
# Triton channel scaling included) and the optimizer-step benchmark (APOLLO and APOLLO-Mini rows
# included), the peak-memory benchmark and a short LLaMA-60M comparison of AdamW,
# GaLoreAdamW and DCTProjAdam. Each step has its own time limit (together about 8 minutes on one
# H100/H200); a failing or timed-out step does not stop the others, and the suite exits 1 at the
# end if any failed. Results, logs and summary_<device>.md go to experiments/results/<device>/.
#
#   bash experiments/bench/gpu_suite.sh              # CUDA machine
#   bash experiments/bench/gpu_suite.sh --out DIR    # results elsewhere
#   bash experiments/bench/gpu_suite.sh --dry        # toy sizes on the CPU (the default without CUDA)
#
# Dry mode runs the same steps at toy sizes on the CPU (Triton under TRITON_INTERPRET=1 where a
# step needs kernels) into a temporary folder unless --out is given, in about two minutes, so that CI
# runs it (tests/experiments/test_gpu_suite.py) and the suite cannot rot. Every dry step measures something real
# at its toy size and is ok only if it leaves its outputs, as on the GPU. PYTHON selects the interpreter
# (default python3), which must import torch and the installed lowrank_optim.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

COMMAND="bash experiments/bench/gpu_suite.sh${*:+ $*}"
DRY=0
OUT=""
while (($#)); do
    case $1 in
        --dry) DRY=1 ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_suite: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if [[ -n $OUT ]]; then  # relative to the caller's folder, before moving to the repository root
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
fi
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # a step killed at its time limit still leaves its whole output in its log

if ((DRY)); then
    export CUDA_VISIBLE_DEVICES=""  # every step on the CPU, also on a GPU machine
fi
if ! PROBE=$("$PYTHON" -c 'import torch, lowrank_optim.kernels
print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "", sep="|")'); then
    echo "gpu_suite: $PYTHON must import torch and lowrank_optim.kernels; install the project first, e.g." >&2
    echo "    $PYTHON -m pip install --no-deps --no-build-isolation -e ." >&2
    exit 2
fi
IFS='|' read -r TORCH_VERSION DEVICE_NAME <<<"$PROBE"

if [[ -z $DEVICE_NAME ]]; then
    MODE=dry
    DEVICE_NAME="CPU (dry run: toy sizes)"
    SLUG=cpu_dry
    OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")}
    # Shared 2-core CI machines: oversubscribed OpenMP threads make every step crawl.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    INTERPRET=1
    # Seconds per step: generous, a loaded CPU is slow; the whole dry run takes about two minutes.
    declare -A BUDGET=([kernel_tests]=90 [fsdp_smoke]=90 [kernels_bench]=90 [optimizer_step_float32]=90
        [optimizer_step_bfloat16]=90 [memory_bench]=90 [compare]=90)
    # The kernel tests run in CI's own pytest on the CPU; here only their collection is checked.
    KERNEL_TESTS=(--collect-only)
    FSDP=(--device cpu --model_config llama_micro --num_training_steps 4 --save_every 2 --batch_size 2
        --max_length 32 --eval_every 2 --eval_tokens 256)
    KERNELS_BENCH=(--smoke)
    OPTIMIZER_STEP=(--device cpu --shape 96 40 --rank 8 --repeats 2 --threads 1)
    # One baseline and one library configuration of the smallest model, 16-token sequences (about
    # 40 s on a loaded 2-core CPU; the model is LLaMA-130M whatever the size flags).
    MEMORY_BENCH=(--models 130M --configs adamw_fused dct_bp --stress --skip_7b --seq 16 --threads 1)
    COMPARE=(--model_config llama_micro --num_training_steps 4 --batch_size 2 --max_length 32 --rank 4
        --update_proj_gap 2 --eval_every 2 --eval_tokens 256)
else
    MODE=gpu
    SLUG=$(tr '[:upper:]' '[:lower:]' <<<"$DEVICE_NAME" | sed -E 's/[^a-z0-9]+/_/g; s/^_+|_+$//g')
    OUT=${OUT:-$PWD/experiments/results/$SLUG}
    INTERPRET=0
    # Seconds per step, 490 in all. Estimates for an H100/H200 (the sizes below are chosen to fit
    # them; kernels_bench's APOLLO channel-scaling section not yet timed on one); the summary's wall
    # times are the measurements to retune them by.
    declare -A BUDGET=([kernel_tests]=120 [fsdp_smoke]=45 [kernels_bench]=90 [optimizer_step_float32]=40
        [optimizer_step_bfloat16]=40 [memory_bench]=60 [compare]=95)
    KERNEL_TESTS=()  # every case, the bf16 ones that skip on the CPU included
    # Triton compiles (CPU-bound) and autotunes each new shape in every process: spread the tests
    # over processes where pytest-xdist is installed.
    if "$PYTHON" -c 'import xdist' 2>/dev/null; then
        KERNEL_TESTS=(-n 8)
    fi
    # FSDP2 on one rank still runs NCCL collectives and a sharded (DCP) checkpoint at steps 10, 20.
    FSDP=(--device cuda --model_config llama_60m --dtype bfloat16 --num_training_steps 20 --save_every 10
        --batch_size 8 --max_length 256 --eval_every 10 --eval_tokens 16K)
    # LLaMA-1B shapes only: every new shape costs Triton compilation and autotuning.
    KERNELS_BENCH=(--sizes 1B --ranks 128 512 --budget-ms 50)
    # LLaMA-1B's down_proj; each GaLore refresh is an fp32 SVD of it.
    OPTIMIZER_STEP=(--device cuda --shape 2048 5461 --rank 512 --repeats 5)
    # LLaMA-350M bf16: AdamW(fused) against the 8-bit DCT rows with backward projection and with the
    # step in the backward pass, one fresh process each (the full table runs apart: README).
    MEMORY_BENCH=(--device cuda --models 350M --configs adamw_fused dct_8bit_bp dct_8bit_sib --stress --skip_7b)
    # 300 steps x 16 x 128 tokens = 614K tokens per method (fp32: the script has no TF32 switch),
    # GaLore's rank 128 for 60M; gap 100 (GaLore: 200) so that the short run sees three refreshes.
    COMPARE=(--model_config llama_60m --num_training_steps 300 --batch_size 16 --max_length 128 --rank 128
        --update_proj_gap 100 --eval_every 50 --eval_tokens 65536)
fi
mkdir -p "$OUT/logs"
SUMMARY="$OUT/summary_$SLUG.md"

ROWS=()
FAILED=()
STEP_PID=""
# shellcheck disable=SC2317  # reached through the trap below
on_signal() {
    if [[ -n $STEP_PID ]]; then
        kill -TERM "$STEP_PID" 2>/dev/null || true  # timeout passes it on to the step's processes
    fi
    echo "gpu_suite: interrupted; partial results in $OUT" >&2
    exit 130
}
trap on_signal INT TERM

record() {  # record NAME STATUS EXIT_CODE WALL_S OUTPUTS
    local budget=${BUDGET[$1]}
    ROWS+=("| $1 | $2 | $3 | $4 | $budget | ${5:-log only} |")
    echo "    $2 ($4 s of $budget s)"
    if [[ $2 != ok ]]; then
        FAILED+=("$1")
    fi
}

# run_step NAME "EXPECTED OUTPUTS" COMMAND...
# Runs COMMAND within BUDGET[NAME] seconds, its output in logs/NAME_<device>.log. The step is ok when
# COMMAND exits 0 and every expected output (paths or globs under $OUT) exists: a benchmark that
# finds no GPU exits 0 without measuring anything.
run_step() {
    local name=$1 expected=$2
    shift 2
    local budget=${BUDGET[$name]} log="$OUT/logs/${name}_$SLUG.log" start=$SECONDS rc=0 status pattern
    local -a patterns missing=()
    read -ra patterns <<<"$expected"
    echo "--> $name"
    printf '+ %s\n' "$*" >"$log"
    # In the background so that a signal to this script reaches the trap at once; timeout kills the
    # step's whole process group (torchrun's workers included).
    timeout --kill-after=10 "$budget" "$@" >>"$log" 2>&1 </dev/null &
    STEP_PID=$!
    wait "$STEP_PID" || rc=$?
    STEP_PID=""
    local wall=$((SECONDS - start))
    for pattern in "${patterns[@]}"; do
        compgen -G "$OUT/$pattern" >/dev/null || missing+=("$pattern")
    done
    if ((rc == 124 || (rc == 137 && wall >= budget))); then
        status=TIMEOUT
    elif ((rc != 0)); then
        status=FAILED
    elif ((${#missing[@]})); then
        status="NO OUTPUT: ${missing[*]}"
    else
        status=ok
    fi
    record "$name" "$status" "$rc" "$wall" "$expected"
}

SUITE_START=$SECONDS
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(GIT_OPTIONAL_LOCKS=0 git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    COMMIT+=" with uncommitted changes"
fi
echo "gpu_suite: $MODE mode on $DEVICE_NAME, torch $TORCH_VERSION, writing to $OUT"

# (a) The kernel tests on the GPU: their bf16 cases skip on the CPU (the interpreter's bf16 is wrong).
run_step kernel_tests "kernel_tests_$SLUG.xml" \
    "$PYTHON" -m pytest -rfEs -p no:cacheprovider tests/kernels/test_kernels_*.py \
    --junitxml="$OUT/kernel_tests_$SLUG.xml" "${KERNEL_TESTS[@]}"

# (a) FSDP2 through the training script: NCCL on CUDA (gloo on the CPU), one process.
run_step fsdp_smoke "fsdp_smoke_$SLUG/metrics.jsonl fsdp_smoke_$SLUG/model_*/sharded/.metadata" \
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m experiments.pretrain --fsdp \
    --optimizer dct_adamw --wandb_mode disabled --save_dir "$OUT/fsdp_smoke_$SLUG" "${FSDP[@]}"
# The checkpoints were checked above; at 60M they are hundreds of MB, not results to keep.
rm -rf "$OUT/fsdp_smoke_$SLUG"/model_*

# (b) The kernel benchmark, its kernel sections: the moment update, the selection, the fused
# ordinary step and APOLLO's channel scaling (norms + scaled update, per channel and per tensor, Triton
# against PyTorch). Its whole-optimizer section (every LLaMA-1B weight; GaLore's refresh is 168 SVDs)
# takes minutes and runs apart (experiments/README.md).
run_step kernels_bench "kernels_bench_$SLUG.csv" \
    env TRITON_INTERPRET=$INTERPRET "$PYTHON" -m experiments.bench.kernels_bench \
    --sections moment selection step channel --csv "$OUT/kernels_bench_$SLUG.csv" "${KERNELS_BENCH[@]}"

# (c) One weight's optimizer step against torch.optim.AdamW(fused=True) and galore_torch: every
# library row, APOLLO (rank as below, basis cached and generated, proj="dct") and APOLLO-Mini (rank 1)
# included (on CUDA their update runs the Triton channel-scaling kernels), next to apollo-torch's.
for dtype in float32 bfloat16; do
    run_step "optimizer_step_$dtype" "optimizer_step_${dtype}_$SLUG.csv" \
        "$PYTHON" -m experiments.bench.optimizer_step --dtype "$dtype" \
        --csv "$OUT/optimizer_step_${dtype}_$SLUG.csv" "${OPTIMIZER_STEP[@]}"
done

# (d) Peak memory of a training step against AdamW(fused), one fresh process per configuration.
run_step memory_bench "memory_bench_$SLUG/results.md memory_bench_$SLUG/results.json" \
    "$PYTHON" -m experiments.bench.memory --out "$OUT/memory_bench_$SLUG" "${MEMORY_BENCH[@]}"

# (e) AdamW, GaLoreAdamW and DCTProjAdam on the same model, tokens and seed.
run_step compare "compare_$SLUG/results.md compare_$SLUG/results.json compare_$SLUG/val_loss.png" \
    "$PYTHON" -m experiments.results.compare --methods adamw galore_adamw dct_default --seed 0 \
    --out "$OUT/compare_$SLUG" --runs_dir "$OUT/compare_$SLUG/runs" "${COMPARE[@]}"
# Every run ends with a checkpoint (--save_every 0: that one only); hundreds of MB each at 60M, not results.
rm -rf "$OUT/compare_$SLUG"/runs/*/model_*

if ((${#FAILED[@]})); then
    RESULT="FAILED: ${#FAILED[@]} of ${#ROWS[@]} steps (${FAILED[*]}); their logs are in logs/."
else
    RESULT="All ${#ROWS[@]} steps passed."
fi
{
    echo "# GPU suite: $DEVICE_NAME"
    echo
    echo "Mode $MODE; torch $TORCH_VERSION; commit $COMMIT; started $STARTED; $((SECONDS - SUITE_START)) s in all."
    echo "Command: \`$COMMAND\`; outputs are relative to this file's folder."
    echo
    echo "| step | status | exit code | wall s | budget s | outputs |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "$RESULT"
} >"$SUMMARY"
echo
cat "$SUMMARY"
echo
echo "gpu_suite: summary in $SUMMARY"
exit $((${#FAILED[@]} > 0))
