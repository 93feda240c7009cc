# Session 3, device call 3 (decode default now lr_width 32): #5 base_lr_shared vs full_shared
# at Lctx 256 and 16384; many trajectories (base_lr_shared, batch 1/4/16 at Lctx 1024).
R=/tmp/r; mkdir -p $R
python3 -c "import jax; print(jax.__version__, jax.devices())" > $R/env.txt 2>&1
timeout -k 5 170 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 256,16384 --schemes full_shared,base_lr_shared --max-len 66560 --prefill-buckets 64,1024 --attention pallas --no-progress --out $R/trace > $R/trace.log 2>&1
tar czf $OUT/r.tgz -C $R .; grep -v Warn $R/trace.log | tail -8
for b in 1 4 16; do
  timeout -k 5 110 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 1024 --batch $b --schemes base_lr_shared --max-len 5120 --prefill-buckets 64,1024 --attention pallas --no-progress --out $R/trace-b$b > $R/trace-b$b.log 2>&1
  tar czf $OUT/r.tgz -C $R .; grep -v Warn $R/trace-b$b.log | tail -3
done
