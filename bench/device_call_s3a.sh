# Session 3, device call 1: #5 skinny Pallas product vs XLA (micro + batch-1 step);
# #4 lora_dot='wide' probe + ncu stall profile of the decode split pass (plain / mma / wide).
R=/tmp/r; mkdir -p $R
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee $R/env.txt
nvidia-smi --query-gpu=name,memory.total,clocks.max.mem --format=csv >> $R/env.txt
timeout 170 python3 scripts/bench_step.py --shape llama-3.1-8b --context 4096 --batch 1 --gemv 1:1,1:2,1:1:triton,2:2:triton --matmul-impl xla,triton --out $R 2>&1 | grep -v Warn | tee $R/step.log
timeout 110 python3 scripts/probe_decode.py --shapes 1:16k,1:32k,8:4k,8:32k --variants plain,mma,wide --out $R 2>&1 | grep -v Warn | tee $R/probe.log
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for v in plain mma wide; do
  timeout 70 ncu --clock-control none -k regex:split -c 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    python3 scripts/probe_decode.py --shapes 8:4k --variants $v --reps 1 > $R/ncu_$v.txt 2>&1
  grep -v "^==PROF\|^$" $R/ncu_$v.txt | tail -60
done
tar czf $OUT/r.tgz -C $R .
