# Next device call (written in session 4 after its device time ran out; not yet run).
# 1. #4: per-variant prefill defaults (plain 64 x 64 / 3 stages / 4 warps, LoRA 128 x 128 / 2 / 8),
#    untuned. Prediction from s4 call 6's tuning table: plain 8k 1.90 -> 1.50 ms, LoRA 2.22 -> 1.83 ms.
# 2. #5: prefill chunk planning (plan_chunks): the trace at Lctx 256 with the engine's default
#    buckets (16,64,256,1024; a 264-token turn now runs as 256 + 8, not padded to 1024) against
#    --prefill-buckets 64,1024 in the same call. Prediction: TTFT ~0.25 -> ~0.18 s at 256.
R=/tmp/r; mkdir -p $R
snap() { tar czf $OUT/r.tgz -C $R .; }
python3 -c "import jax; print(jax.__version__, jax.devices())" > $R/env.txt 2>&1
timeout -k 5 90 python3 scripts/bench_kernels.py --only prefill --no-tune --kv-lens 4k,8k,16k --out $R/kernels > $R/kernels.log 2>&1; snap
timeout -k 5 150 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 256,2048 --schemes full_shared,base_lr_shared --max-len 9216 --prefill-buckets 64,1024 --attention pallas --no-progress --out $R/trace-b2 > $R/trace-b2.log 2>&1; snap
timeout -k 5 200 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 256,2048 --schemes full_shared,base_lr_shared --max-len 9216 --attention pallas --no-progress --out $R/trace-b4 > $R/trace-b4.log 2>&1; snap
timeout -k 5 140 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 16384 --schemes full_shared,base_lr_shared --max-len 66560 --attention pallas --no-progress --out $R/trace16k > $R/trace16k.log 2>&1; snap
grep -v Warn $R/kernels.log | tail -20; grep -hv Warn $R/trace-b2.log $R/trace-b4.log $R/trace16k.log | grep -E "^(full|base)"
