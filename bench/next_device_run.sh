# Ready for the next session's device time (H100 or H200; note the card). One call, ~7 min.
# Every step writes under /tmp/r and the tarball is refreshed after each, so a step that
# runs long loses only itself. Never pipe ncu: a killed ncu leaves its child holding the pipe.
R=/tmp/r; mkdir -p $R
python3 -c "import jax; print(jax.__version__, jax.devices())" > $R/env.txt 2>&1
snap() { tar czf $OUT/r.tgz -C $R .; }
# 1. #5: fused q|k|v and gate|up (prediction: products 5.13 -> ~4.9 ms, step 5.86 -> ~5.5 ms on H200)
timeout -k 5 60 python3 scripts/profile_step.py products --shape llama-3.1-8b > $R/products.log 2>&1
timeout -k 5 60 python3 scripts/profile_step.py products --shape llama-3.1-8b --fused >> $R/products.log 2>&1
timeout -k 5 150 python3 scripts/bench_step.py --shape llama-3.1-8b --context 4096 --batch 1,8 --gemv 1:2 --fuse-projections 0,1 --out $R > $R/step.log 2>&1; snap
# 2. #5: base_lr_shared vs full_shared with the fused projections, 1.9k and 66.4k tokens
timeout -k 5 170 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 256,16384 --schemes full_shared,base_lr_shared --fuse-projections --max-len 66560 --prefill-buckets 64,1024 --attention pallas --no-progress --out $R/trace > $R/trace.log 2>&1; snap
grep -hv Warn $R/products.log $R/step.log | tail -8; grep -v Warn $R/trace.log | tail -8
