#!/bin/bash
# Session-4 resident-path run (one device call): compiled tests of the decode kernels, then the
# 8B profile and llama-bench-like e2e figures. Results under $OUT. See BUILD.md for the prefix.
#   STEPS="tests rope kmtest kbench kbpf shapetest qmmtest qmmbench iprobe pinprobe check ident profile e2e variants tiers q6k disk4 big" \
#   QUANTS="Q8_0 Q4_0" FUSE_ROPE=on,off PREFETCH=on,off PREFILL=on,off NORM_WARPS=0,16 FUSE_NORM=on,off SHAPE_TILES=on,off \
#   bash benchmarks/run_s4.sh
set -u
OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-tests profile e2e}
QUANTS=${QUANTS:-Q8_0 Q4_0}
SHAPE=${SHAPE:-8b}
mkdir -p "$OUT" /root/models
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [[ $STEPS == *tests* ]]; then
    KERNELS_INTERPRET=0 timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_rope_cache.py \
        2>&1 | tail -2
    KERNELS_INTERPRET=0 timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
        -k "glu or stacked or self_test or shape_tuned" 2>&1 | tail -2
fi
if [[ $STEPS == *rope* ]]; then   # the fused RoPE + cache write + attention kernel compiled
    KERNELS_INTERPRET=0 timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py -k rope \
        2>&1 | tail -4
fi
if [[ $STEPS == *kmtest* ]]; then  # the decode kernels compiled, the types of KTYPES (pytest -k)
    KERNELS_INTERPRET=0 timeout ${KT_TIMEOUT:-300} python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
        -k "${KTYPES:-Q4_0 or Q8_0 or Q4_1}" 2>&1 | tail -3
fi
if [[ $STEPS == *kbench* ]]; then  # decode kernels on the 70B shapes against XLA (KB_ARGS: --quick, --types)
    timeout ${KB_TIMEOUT:-300} python3 benchmarks/kernels_bench.py ${KB_ARGS:---quick} --out "$OUT/kernels.json" 2>&1 \
        | grep -v "^I1\|^W1" | tail -${KB_TAIL:-40}
fi
if [[ $STEPS == *kbpf* ]]; then   # decode kernels at M = 1, the default tiles without and with prefetch
    for pf in "" --prefetch; do
        timeout ${KB_TIMEOUT:-150} python3 benchmarks/kernels_bench.py --quick --m 1 ${KB_ARGS:-} $pf \
            --out "$OUT/kernels-m1${pf:+-prefetch}.json" 2>&1 | grep -v "^I1\|^W1" | tail -${KB_TAIL:-40}
    done
fi
if [[ $STEPS == *qmmtest* ]]; then  # the prefill kernel compiled
    KERNELS_INTERPRET=0 timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_qmatmul.py 2>&1 | tail -2
fi
if [[ $STEPS == *qmmbench* ]]; then  # the prefill kernel tuned and timed against XLA
    timeout ${QMM_TIMEOUT:-330} python3 benchmarks/qmatmul_bench.py ${QMM_ARGS:-} --out "$OUT" 2>&1 | grep -v "^I1\|^W1" | tail -${QMM_TAIL:-60}
fi
if [[ $STEPS == *iprobe* ]]; then    # resident vs layered identity, decode-sized and prefill
    timeout 240 python3 benchmarks/ident_probe.py 2>&1 | grep -v "^I1\|^W1" | tail -4
fi
if [[ $STEPS == *pinprobe* ]]; then     # whose pinned memory: RssShmem per stage, per XLA pool cap
    timeout 300 python3 benchmarks/pinned_probe.py --layers 8 --passes 5 --kinds ${KINDS:-pin_tree,hostalloc,register} --out "$OUT" 2>&1 | tail -7
fi
if [[ $STEPS == *check* ]]; then     # float64 logits on the GPU, kernels on, tiny synthetic files
    models=""
    for q in Q4_0 Q8_0 Q4_K_M Q6_K; do
        f=/root/models/tiny-$q.gguf
        [ -f "$f" ] || python3 -m ntransformer_jax.synth --shape tiny --quant "$q" --out "$f" >/dev/null
        models="$models${models:+,}$f"
    done
    timeout 240 python3 benchmarks/gpu_check.py --models "$models" --out "$OUT" 2>&1 | tail -6
fi
if [[ $STEPS == *profile* ]]; then
    for q in $QUANTS; do
        timeout 200 python3 benchmarks/profile_decode.py --shape "$SHAPE" --quant "$q" --tokens 32 --top 40 --keep_trace \
            --out "$OUT/prof-$SHAPE-$q" --workdir /root/models 2>&1 | grep -v "^I1\|^W1" | tail -32
    done
fi
if [[ $STEPS == *variants* ]]; then   # loop unroll 2 and CUDA-graph command buffers, untraced
    for v in ${VARIANTS:-"2:" "1:+WHILE,+CONDITIONAL" "2:+WHILE,+CONDITIONAL"}; do
        unroll=${v%%:*}; cb=${v#*:}
        flags=""; [[ -n $cb ]] && flags="--xla_gpu_enable_command_buffer=$cb --xla_gpu_graph_min_graph_size=1"
        XLA_FLAGS="$flags" timeout 200 python3 benchmarks/profile_decode.py --shape "$SHAPE" --quant Q8_0 \
            --tokens 32 --scan_unroll "$unroll" --top 3 --out "$OUT/var-u$unroll${cb:+-cb}" \
            --workdir /root/models 2>&1 | grep "us/token wall"
    done
fi
if [[ $STEPS == *e2e* ]]; then
    for q in $QUANTS; do
        timeout 300 python3 benchmarks/e2e.py --shape "$SHAPE" --quant "$q" --kernels auto --matmul bf16 \
            --prefill_kernel ${PREFILL:-off} --fuse_x ${FUSE:-on} --norm_warps ${NORM_WARPS:-0} --fuse_norm ${FUSE_NORM:-on} --shape_tiles ${SHAPE_TILES:-on} \
            --fuse_rope ${FUSE_ROPE:-off} --prefetch ${PREFETCH:-off} --repeats 3 --out "$OUT" --workdir /root/models 2>&1 | grep --line-buffered "tg128"
    done
fi
if [[ $STEPS == *tiers* ]]; then     # issue 4: spread vs index order, mmap baseline, small RAM budget
    timeout 560 python3 benchmarks/tiers_bench.py --shape 70b --quant Q4_0 --vram_budget_gb ${VRAM:-24} \
        --ram_budget_gb 22 --n_decode 8 --index_layout --n_mmap 3 --drop_caches --disk_ram_budget_gb 4 \
        --n_disk 2 --out "$OUT" --workdir /root/models 2>&1 | grep -v "^I1\|^W1" | tail -30
fi
if [[ $STEPS == *q6k* ]]; then      # issue 4: 70B Q6_K at --vram_budget_gb 24, the rest in RAM
    timeout 560 python3 benchmarks/tiers_bench.py --shape 70b --quant Q6_K --vram_budget_gb ${VRAM:-24} \
        --n_decode 8 --n_mmap 0 --disk_ram_budget_gb 0 --out "$OUT" --workdir /root/models \
        2>&1 | grep -v "^I1\|^W1" | tail -12
fi
if [[ $STEPS == *disk4* ]]; then    # issue 4: 70B Q4_0 with 4 GB of RAM (35 layers from disk)
    timeout 560 python3 benchmarks/tiers_bench.py --shape 70b --quant Q4_0 --vram_budget_gb ${VRAM:-24} \
        --ram_budget_gb 22 --n_decode 4 --n_mmap 0 --drop_caches --disk_ram_budget_gb 4 --n_disk 3 \
        --out "$OUT" --workdir /root/models 2>&1 | grep -v "^I1\|^W1" | tail -12
fi
if [[ $STEPS == *shapetest* ]]; then   # the per-shape tiles compiled
    KERNELS_INTERPRET=0 timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k shape_tuned 2>&1 | tail -2
fi
if [[ $STEPS == *ident* ]]; then    # placement identity with the compiled kernels
    timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_tiers.py -k "bit_identical" 2>&1 | tail -2
fi
if [[ $STEPS == *big* ]]; then       # 70B Q4_0 resident (40 GB): pp512 / tg128
    timeout ${BIG_TIMEOUT:-500} python3 benchmarks/e2e.py --shape 70b --quant Q4_0 --kernels auto --matmul bf16 \
        --prefill_kernel ${PREFILL:-off} --fuse_x ${FUSE:-on} --norm_warps ${NORM_WARPS:-0} --fuse_rope ${FUSE_ROPE:-off} \
        --prefetch ${PREFETCH:-off} --shape_tiles ${SHAPE_TILES:-on} --repeats ${BIG_REPEATS:-3} --out "$OUT" --workdir /root/models 2>&1 | grep --line-buffered "tg128"
fi
