# Session 2, device call 2: #6 BLR concurrent check; #5 batch-1 padding; #4 LR prefetch probe + decode table.
python3 -c "import jax; print(jax.__version__, jax.devices())"
timeout 120 python3 scripts/check_device.py concurrent --schemes base_lr_shared 2>&1 | tee $OUT/check_concurrent_blr.log
timeout 90 python3 scripts/probe_decode.py --variants plain,mma,mma_nopf,fma --out $OUT 2>&1 | grep -v Warn | tee $OUT/probe.log
timeout 190 python3 scripts/bench_step.py --shape llama-3.1-8b --context 4096 --batch 1 --min-matmul-rows 1,2 --out $OUT 2>&1 | grep -v Warn | tee $OUT/step.log
timeout 190 python3 scripts/bench_kernels.py --only decode --check --out $OUT/kernels 2>&1 | grep -v Warn | tee $OUT/kernels.log
