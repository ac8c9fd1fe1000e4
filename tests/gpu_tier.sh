#!/bin/bash
# The GPU tier (-m "gpu and not slow") split over five processes sharing one GPU (Triton compiles on one host
# core per process, so the tier is compile-bound), plus the GPU fuzz tier (tests/gpu_fuzz.sh), in one device call.
#
#   tests/gpu_tier.sh [SECONDS=520] [FUZZ_PROCS=6] [FUZZ_EXAMPLES_PER_PROC=30]
#
# Every pytest gets SIGINT after SECONDS (it then reports what ran). Logs: /tmp/logs, tarred to $OUT/logs.tgz
# when $OUT is set (the device tool's output folder).
export PYTHONPATH=src PYTHONUNBUFFERED=1 FLASHATTN_AUTOTUNE=0
T=${1:-520}; L=/tmp/logs; mkdir -p $L
run() { name=$1; shift; timeout -s INT $T python -m pytest -q -m "gpu and not slow" -p no:cacheprovider -W ignore --tb=short "$@" > $L/t_$name.log 2>&1; echo "$name: $(tail -1 $L/t_$name.log)"; }
run triton tests/test_triton.py &
run edge tests/test_edge_cases.py tests/test_determinism.py &
run var tests/test_varlen.py tests/test_sinks.py tests/test_global_tokens.py tests/test_dropout.py &
run sparse tests/test_blocksparse.py tests/test_kvcache.py tests/test_fp8_kvcache.py &
run misc tests/test_fp8.py tests/test_transformers.py tests/test_concurrency.py tests/test_autotune_cache.py tests/test_leaks.py &
FUZZ_LOG_DIR=$L bash tests/gpu_fuzz.sh ${2:-6} ${3:-30} > $L/fuzz.txt 2>&1 &
fz=$!
( sleep $((T+15)); pkill -INT -f pytest ) & guard=$!
wait $fz; for j in $(jobs -p); do [ $j = $guard ] || wait $j; done; kill $guard 2>/dev/null
cat $L/fuzz.txt
grep -h "FAILED\|Error" $L/t_*.log | head -30
[ -n "${OUT:-}" ] && tar czf $OUT/logs.tgz -C /tmp logs
