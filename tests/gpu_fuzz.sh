#!/bin/bash
# GPU differential fuzzing, spread over several processes sharing one GPU.
#
#   tests/gpu_fuzz.sh [PROCS=8] [EXAMPLES_PER_PROC=40] [extra pytest args...]
#
# The GPU fuzz tier is compile-bound: nearly every drawn problem (variant flags, head dim, dtype, tile
# config) is a new kernel, and Triton compiles on one host core per process (~5 s for the three kernels),
# so 300 examples take over 15 minutes in one process. PROCS processes compile in parallel on the host's
# cores; process i draws with --hypothesis-seed=i, so the examples differ between processes and a failure
# is reproduced by rerunning that seed (the log says which). Logs: ${FUZZ_LOG_DIR:-.}/gpu_fuzz_<i>.log.
# On a host with several GPUs, process i runs on GPU i mod (number of GPUs). Ten thousand examples
# (`tests/gpu_fuzz.sh 128 80` on the 8-GPU host, like the `-m "gpu and slow"` tier) need ~9,700 distinct kernel
# builds (counted on the CPU from 10,000 drawn examples; ~1.5-2 s each, shared through Triton's on-disk cache):
# ~20 minutes of compiling on 16 host cores, ~3 on 128.
set -u
procs=${1:-8}
per=${2:-40}
shift $(( $# < 2 ? $# : 2 ))
dir=${FUZZ_LOG_DIR:-.}
export PYTHONPATH=${PYTHONPATH:-src} FLASHATTN_AUTOTUNE=${FLASHATTN_AUTOTUNE:-0} FLASHATTN_FUZZ_GPU_EXAMPLES=$per
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
[ "${ngpu:-0}" -ge 1 ] || ngpu=1
pids=()
for ((i = 0; i < procs; i++)); do
    gpu=()   # several GPUs and no CUDA_VISIBLE_DEVICES set by the caller: spread the processes over them
    [ "$ngpu" -gt 1 ] && [ -z "${CUDA_VISIBLE_DEVICES+x}" ] && gpu=(CUDA_VISIBLE_DEVICES=$((i % ngpu)))
    env "${gpu[@]}" python -m pytest -q -m gpu tests/test_fuzz.py -k "test_fuzz_triton_gpu and not 10k" --hypothesis-seed=$i \
        -p no:cacheprovider -W ignore --tb=short "$@" > "$dir/gpu_fuzz_$i.log" 2>&1 &
    pids+=($!)
done
status=0
for ((i = 0; i < procs; i++)); do
    if ! wait "${pids[$i]}"; then r=FAILED; status=1
    elif tail -1 "$dir/gpu_fuzz_$i.log" | grep -q " passed"; then r=passed
    else r="did not run (no GPU?)"; status=1; fi
    echo "seed $i: $r ($per examples): $(tail -1 "$dir/gpu_fuzz_$i.log")"
done
echo "gpu fuzz: $procs processes x $per examples: $([ $status = 0 ] && echo all passed || echo "not all passed, see the logs")"
exit $status
