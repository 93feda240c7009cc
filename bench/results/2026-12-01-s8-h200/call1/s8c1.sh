#!/bin/bash
# Session 8, call 1 on nvidia-h200 (issue 15): the trace with the Mosaic GPU prefill against
# the Triton one (TTFT prediction, perf-notes 1), then the kernel check (lr_pad 8, two matmul timers).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
S=$(date +%s); R=$OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/env.txt; git log -1 --oneline >> $R/env.txt
T="python3 -m bench.trace --shape llama-3.1-8b --lctx 8192 --schemes non_shared,base_lr_shared --no-progress"
timeout 170 $T --attention mosaic_gpu --out /tmp/tm > $R/trace_mgpu.log 2>&1; echo "mgpu trace rc=$? $(($(date +%s)-S))s"
timeout 150 $T --attention pallas --out /tmp/tp > $R/trace_triton.log 2>&1; echo "triton trace rc=$? $(($(date +%s)-S))s"
cp /tmp/tm/results.json $R/trace_mgpu.json; cp /tmp/tp/results.json $R/trace_triton.json
grep -A8 "^scheme" $R/trace_mgpu.log; grep -A8 "^scheme" $R/trace_triton.log
L=$((585-($(date +%s)-S))); timeout $L python3 -m bench.gpu_mgpu_check --out /tmp/mg > $R/mgpu.log 2>&1; echo "mgpu check rc=$? $(($(date +%s)-S))s"
cp /tmp/mg/gpu_mgpu_check.json $R/ 2>/dev/null; sed -n '/== summary ==/,$p' $R/mgpu.log
tail -5 $R/trace_mgpu.log
