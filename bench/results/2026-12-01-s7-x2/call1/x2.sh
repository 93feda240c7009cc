#!/bin/bash
# Session 7, call 1 on nvidia-h200-x2: issue 14's 2-GPU benchmarks.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
S=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpus.txt; nvidia-smi topo -m >> $OUT/gpus.txt 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a $OUT/gpus.txt
echo "== A 8B decode + trace model=1 vs model=2 $(($(date +%s)-S))s"
timeout 230 python3 -m bench.sharded --shape llama-3.1-8b --context 8192 --batch 1,2 --mesh model=1 --mesh model=2 \
  --trace-lctx 8192 --out $OUT/a8b 2>&1 | tee $OUT/a8b.log | grep -v "it/s\]" 
echo "== B 70B trace model=2 $(($(date +%s)-S))s"
timeout 250 python3 -m bench.trace --shape llama-3.1-70b --mesh model=2 --lctx 2048,8192 \
  --schemes base_lr_shared,full_shared,non_shared --no-progress --out $OUT/b70b 2>&1 | tee $OUT/b70b.log
echo "== C 8B decode, latency-hiding scheduler $(($(date +%s)-S))s"
R=$((560-($(date +%s)-S))); [ $R -gt 60 ] && XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true timeout $R python3 -m bench.sharded \
  --shape llama-3.1-8b --context 8192 --batch 1,2 --mesh model=1 --mesh model=2 --out $OUT/c8b_lhs 2>&1 | tee $OUT/c8b_lhs.log | grep -v "it/s\]"
echo "== done $(($(date +%s)-S))s"
cd $OUT && tar czf /tmp/all.tgz . && find . -mindepth 1 -delete && mv /tmp/all.tgz $OUT/all.tgz
