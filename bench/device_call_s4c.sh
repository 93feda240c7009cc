# Session 4, call 6 (#4, #5): prefill defaults now 128 x 128 tiles / 2 stages / 8 warps where
# they fit (the tuner's pick on H100 and H200, 1.74 vs 2.1 ms at 8k, LoRA kernel). Tuning now
# times the plain kernel too. Prediction: the trace's TTFT at Lctx 16384 drops ~10% for both
# schemes (attention is about half of its prefill), base_lr_shared 5.18 -> ~4.7 s.
R=/tmp/r; mkdir -p $R
snap() { tar czf $OUT/r.tgz -C $R .; }
python3 -c "import jax; print(jax.__version__, jax.devices())" > $R/env.txt 2>&1
timeout -k 5 110 python3 scripts/bench_kernels.py --only prefill --kv-lens 4k,16k --out $R/kernels > $R/kernels.log 2>&1; snap
timeout -k 5 140 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 16384 --schemes full_shared,base_lr_shared --max-len 66560 --prefill-buckets 64,1024 --attention pallas --no-progress --out $R/trace > $R/trace.log 2>&1; snap
grep -v Warn $R/kernels.log | tail -24; grep -v Warn $R/trace.log | tail -6
