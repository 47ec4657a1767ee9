#!/bin/bash
# Resident-path figures in one device call (see BUILD.md's GPU section for the install prefix):
# compiled kernel tests, the logits check with the decode kernels on, and llama-bench-like
# pp512/tg128 on synthetic 8B files with the kernels on and off. Results under $OUT.
#   bash benchmarks/resident_run.sh [quant ...]   (default: Q8_0 Q4_0)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
quants=("${@:-Q8_0 Q4_0}")
KERNELS_INTERPRET=0 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "matches_float64 or bit_exact or written" 2>&1 | tail -4
models=$(ls .gpu2/tiny-q*.gguf 2>/dev/null | tr '\n' ',' | sed 's/,$//')
[ -n "$models" ] && timeout 240 python3 benchmarks/gpu_check.py --models "$models" --out "$OUT" 2>&1 | tail -12
for q in ${quants[@]}; do
    timeout 300 python3 benchmarks/e2e.py --shape 8b --quant "$q" --kernels auto,off --matmul bf16 --repeats 3 \
        --out "$OUT" --workdir /root/models 2>&1 | tail -3
done
