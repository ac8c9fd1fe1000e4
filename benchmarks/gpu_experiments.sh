#!/bin/bash
# What the sixth session prepared without a GPU or measured only on an H100 (benchmarks/NOTES.md), checked and
# timed in one device call (at most ~9.5 minutes): correctness first, then the timings; a short summary last.
#
#   OUT=... bash benchmarks/gpu_experiments.sh
#
# 1. the GPU tests of the warp-specialized loops and of the LPT order, of the FP8 forward (V read as given
#    included), and the GPU fuzz of the warp-specialized space (4 processes x 30 examples);
# 2. check_ws.py --fwd-grid: the causal forward, base vs WS (the hdim-128 default since the H100 run) vs LPT, on
#    the benchmark grid (hdim 128): to be confirmed on the H200;
# 3. bench_fp8.py at hdim 128/256, seqlen 4096/16384: fp8 (copy) vs fp8 vT vs fp8 vK (V transposed on chip).
# Logs in /tmp/exp, tarred to $OUT/exp.tgz.
export PYTHONPATH=src PYTHONUNBUFFERED=1
L=/tmp/exp; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader | tee $L/gpu.txt
python -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $L/gpu.txt
( FLASHATTN_AUTOTUNE=0 timeout -s INT 200 python -m pytest -q -m "gpu and not slow" -p no:cacheprovider -W ignore \
    --tb=short tests/test_triton.py -k "warp_specialized or reverse" > $L/t_ws.log 2>&1
  FLASHATTN_AUTOTUNE=0 timeout -s INT 100 python -m pytest -q -m "gpu and not slow" -p no:cacheprovider -W ignore \
    --tb=short tests/test_fp8.py -k "v_as_given or gpu_fp8_forward" > $L/t_fp8.log 2>&1 ) &
tests_pid=$!
fuzz_pids=()
for i in 0 1 2 3; do   # 30 examples each (a third of FLASHATTN_FUZZ_GPU_EXAMPLES), seed i
  FLASHATTN_AUTOTUNE=0 FLASHATTN_FUZZ_GPU_EXAMPLES=90 timeout -s INT 290 python -m pytest -q -m gpu tests/test_fuzz.py \
      -k test_fuzz_triton_gpu_ws --hypothesis-seed=$i -p no:cacheprovider -W ignore --tb=short > $L/fuzz_ws_$i.log 2>&1 &
  fuzz_pids+=($!)
done
wait $tests_pid "${fuzz_pids[@]}"
FLASHATTN_AUTOTUNE=0 timeout 130 python benchmarks/check_ws.py --fwd-grid > $L/check_ws.log 2>&1
timeout 150 python benchmarks/bench_fp8.py --hdims 128 256 --seqlens 4096 16384 --json $L/fp8.json \
    > $L/bench_fp8.log 2>&1
echo "== tests"; for f in $L/t_ws.log $L/t_fp8.log $L/fuzz_ws_*.log; do echo "$f: $(tail -1 $f)"; done
grep -h "FAILED" $L/t_*.log $L/fuzz_ws_*.log | head -20
echo "== causal forward (check_ws.py --fwd-grid)"; grep "^|" $L/check_ws.log | head -12
echo "== FP8 (bench_fp8.py)"; tail -14 $L/bench_fp8.log
[ -n "${OUT:-}" ] && tar czf $OUT/exp.tgz -C /tmp exp
