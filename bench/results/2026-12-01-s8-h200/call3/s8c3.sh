#!/bin/bash
# Session 8, call 3 on nvidia-h200 (issue 15): after the one-lowering-per-program fix and
# AUTO_PICKS_MOSAIC_GPU: the trace with "auto" (= mosaic_gpu on Hopper) against "triton", warm-up included.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
S=$(date +%s); R=$OUT
git log -1 --oneline > $R/env.txt; nvidia-smi --query-gpu=name,driver_version --format=csv >> $R/env.txt
python3 -c "from pallas_kernels.flash_lora_attention import resolve_backend as r; print('auto ->', r('auto'))" | tee -a $R/env.txt
T="python3 -m bench.trace --shape llama-3.1-8b --lctx 8192 --schemes non_shared,base_lr_shared --no-progress"
timeout 230 $T --attention auto --out /tmp/ta > $R/trace_auto.log 2>&1; echo "auto trace rc=$? $(($(date +%s)-S))s"
timeout 160 $T --attention triton --out /tmp/tt > $R/trace_triton.log 2>&1; echo "triton trace rc=$? $(($(date +%s)-S))s"
cp /tmp/ta/results.json $R/trace_auto.json; cp /tmp/tt/results.json $R/trace_triton.json
grep -E "warm-up|^non_shared|^base_lr" $R/trace_auto.log $R/trace_triton.log
L=$((580-($(date +%s)-S))); [ $L -gt 60 ] && timeout $L python3 -m bench.gpu_mgpu_check --parts numerics --out /tmp/mg > $R/mgpu.log 2>&1; echo "numerics rc=$? $(($(date +%s)-S))s"
cp /tmp/mg/gpu_mgpu_check.json $R/ 2>/dev/null; grep -E "PASS|FAIL" $R/mgpu.log | tail -20
