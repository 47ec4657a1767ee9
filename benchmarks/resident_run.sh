#!/bin/bash
# Resident-path figures in one device call (see BUILD.md's GPU section for the install prefix):
# compiled kernel tests, the logits check with the decode kernels on, and llama-bench-like
# pp512/tg128 on synthetic files with the kernels on and off. Results under $OUT.
#   STEPS="tests check kernels layer profile e2e" E2E="8b:Q8_0 8b:Q4_0" MODES=auto,off REPEATS=3 UNROLL=0 \
#       bash benchmarks/resident_run.sh
set -u
OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-tests check e2e}
E2E=${E2E:-8b:Q8_0 8b:Q4_0}
MODES=${MODES:-auto,off}
REPEATS=${REPEATS:-3}
UNROLL=${UNROLL:-0}
mkdir -p "$OUT"
if [[ $STEPS == *tests* ]]; then
    KERNELS_INTERPRET=0 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
        -k "matches_float64 or bit_exact or written or stacked" 2>&1 | tail -2
fi
if [[ $STEPS == *check* ]]; then
    models=$(ls .gpu2/tiny-q*.gguf 2>/dev/null | tr '\n' ',' | sed 's/,$//')
    [ -n "$models" ] && timeout 240 python3 benchmarks/gpu_check.py --models "$models" --out "$OUT" 2>&1 | tail -10
fi
if [[ $STEPS == *kernels* ]]; then     # every decode kernel on the 70B shapes, timed back to back
    timeout 300 python3 benchmarks/kernels_bench.py --budget_s 200 --out "$OUT/kernels.json" 2>&1 | tail -40
fi
if [[ $STEPS == *layer* ]]; then       # one jitted layer, decode and prefill, kernels on
    timeout 300 python3 benchmarks/layer_jit.py --shape 8b,70b --quant Q4_0,Q8_0,Q4_K_M \
        --out "$OUT/layer_jit.json" 2>&1 | tail -10
fi
if [[ $STEPS == *profile* ]]; then     # where a decoded token's time goes, per kernel
    for job in $E2E; do
        shape=${job%%:*}; q=${job#*:}
        timeout 300 python3 benchmarks/profile_decode.py --shape "$shape" --quant "$q" --tokens 32 \
            --out "$OUT/profile-$shape-$q" --workdir /root/models 2>&1 | grep -v "^I1\|^W1" | tail -32
    done
fi
if [[ $STEPS == *e2e* ]]; then
    for job in $E2E; do
        shape=${job%%:*}; q=${job#*:}
        timeout 420 python3 benchmarks/e2e.py --shape "$shape" --quant "$q" --kernels "$MODES" \
            --matmul bf16 --repeats "$REPEATS" --scan_unroll "$UNROLL" --out "$OUT" \
            --workdir /root/models 2>&1 | grep -v "^ \|^\[\|^{\|^}\|^$" | tail -4
    done
fi
