#!/bin/bash
# Where the resident decode's idle device time goes: the same 8B decode under several loop forms
# and command-buffer (CUDA graph) settings, each in a fresh process, plus the host-copy leak probe.
#   SHAPE=8b QUANT=Q8_0 bash benchmarks/dispatch_run.sh     (results under $OUT)
set -u
OUT=${OUT:-/tmp/out}
SHAPE=${SHAPE:-8b}
QUANT=${QUANT:-Q8_0}
VARIANTS=${VARIANTS:-"loop:0: loopcb:0:+WHILE,+CONDITIONAL unroll:-1: unrollcb:-1:+WHILE,+CONDITIONAL nocb:0:NONE"}
mkdir -p "$OUT"
[[ ${LEAK:-1} == 1 ]] && timeout 120 python3 benchmarks/leak_probe.py --n 2000 --mb 4 --out "$OUT" 2>&1 | grep -v "^W1\|^I1"
for v in $VARIANTS; do
    name=${v%%:*}; rest=${v#*:}; unroll=${rest%%:*}; cb=${rest#*:}
    flags=""
    [[ $cb == NONE ]] && flags="--xla_gpu_enable_command_buffer="
    [[ -n $cb && $cb != NONE ]] && flags="--xla_gpu_enable_command_buffer=$cb --xla_gpu_graph_min_graph_size=1"
    XLA_FLAGS="$flags" timeout 200 python3 benchmarks/profile_decode.py --shape "$SHAPE" --quant "$QUANT" \
        --tokens 32 --scan_unroll "$unroll" --top 12 --out "$OUT/$name" --workdir /root/models 2>&1 \
        | grep -v "^I1\|^W1" | tail -19
done
