# Second ready-made call (issue 5 item 3): many trajectories in one jitted step, throughput
# against batch size, the paper's trace at Lctx 1024 with 1, 4 and 16 independent sessions.
python3 -c "import jax; print(jax.__version__, jax.devices())"
for b in 1 4 16; do
  timeout 180 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 1024 --batch $b --schemes non_shared,full_shared,base_lr_shared \
    --max-len 5120 --prefill-buckets 64,1024 --attention pallas --no-progress --out $OUT/trace-b$b 2>&1 | grep -v Warn | tee $OUT/trace-b$b.log
done
