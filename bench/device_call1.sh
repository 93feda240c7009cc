# Session 2, device call 1: issue 6 (concurrent check + N-scaling) and issue 4 (decode LoRA probe).
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import jax; print(jax.__version__, jax.devices())"
timeout 320 python3 scripts/bench_concurrent.py --shape llama-3.1-8b --context 32768,8192,131072 --agents 1,2,4,8 --out $OUT 2>&1 | grep -v Warn | tee $OUT/concurrent.log
timeout 80 python3 scripts/check_device.py concurrent 2>&1 | tee $OUT/check_concurrent.log
timeout 100 python3 scripts/probe_decode.py --out $OUT 2>&1 | grep -v Warn | tee $OUT/probe.log
for v in plain mma; do
  timeout 35 ncu --clock-control none -k regex:split -c 1 --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
    python3 scripts/probe_decode.py --shapes 8:32k --variants $v --reps 1 > $OUT/ncu_$v.txt 2>&1
  tail -60 $OUT/ncu_$v.txt | grep -v "^    ---\|^$" | head -45
done
