# Session 4, call 7 (#4, #5): per-variant prefill defaults (plain 64 x 64 / 3 stages / 4 warps,
# LoRA 128 x 128 / 2 / 8), measured untuned; then the trace point at Lctx 16384 if time allows.
# Prediction from call 6's tuning table: plain 8k 1.90 -> 1.50 ms, so full_shared's TTFT drops.
R=/tmp/r; mkdir -p $R
snap() { tar czf $OUT/r.tgz -C $R .; }
timeout -k 5 60 python3 scripts/bench_kernels.py --only prefill --no-tune --kv-lens 4k,16k --out $R/kernels > $R/kernels.log 2>&1; snap
grep -v Warn $R/kernels.log | tail -20
timeout -k 5 100 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 16384 --schemes full_shared,base_lr_shared --max-len 66560 --prefill-buckets 64,1024 --attention pallas --no-progress --out $R/trace > $R/trace.log 2>&1; snap
grep -v Warn $R/trace.log | tail -5
