# Session 4, call 5 (#4, #5): the decode kernel with its new defaults (block_k 64 / 3 stages;
# split count = one wave of resident programs). Predictions (H200): LoRA over plain at b8
# +21% -> <= +10% at 4k and <= +5% at 32k; b1 unchanged (+7% at >= 32k). Then the trace
# (full_shared vs base_lr_shared, fused projections) with the new kernel defaults.
R=/tmp/r; mkdir -p $R
snap() { tar czf $OUT/r.tgz -C $R .; }
python3 -c "import jax; print(jax.__version__, jax.devices())" > $R/env.txt 2>&1
timeout -k 5 200 python3 scripts/bench_kernels.py --only decode --no-tune --check --kv-lens 4k,16k,32k,128k --out $R/kernels > $R/kernels.log 2>&1; snap
timeout -k 5 170 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 256,16384 --schemes full_shared,base_lr_shared --fuse-projections --max-len 66560 --prefill-buckets 64,1024 --attention pallas --no-progress --out $R/trace > $R/trace.log 2>&1; snap
grep -v Warn $R/kernels.log | tail -42; grep -v Warn $R/trace.log | tail -8
