# Session 2, device call 3: #5 trace at Lctx 256/512/16384 + naive ablation; projection padding.
python3 -c "import jax; print(jax.__version__, jax.devices())"
timeout 40 python3 scripts/bench_step.py --shape llama-3.1-8b --gemv-only --gemv 1:1,1:2,1:4,1:8,1:16,8:8 2>&1 | grep -v Warn | tee $OUT/gemv.log
timeout 440 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 256,512,16384 --naive-expansion --max-len 66560 --prefill-buckets 64,1024 --attention pallas --no-progress --out $OUT/trace 2>&1 | grep -v Warn | tee $OUT/trace.log
timeout 100 python3 scripts/bench_step.py --shape llama-3.1-8b --context 4096 --batch 1 --min-matmul-rows 2,8 --out $OUT 2>&1 | grep -v Warn | tee $OUT/step.log
