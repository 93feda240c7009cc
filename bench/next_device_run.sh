# Ready for the next session's device time (one call, ~9 min; H100 or H200, note the card).
# 1. #5: skinny Pallas product vs XLA (micro, then the batch-1 step).
# 2. #5: base_lr_shared at Lctx 16384 (its session-2 row had a compile inside the timing).
# 3. #6: the 131k concurrent point.
# 4. #4: lora_dot='wide' (one MMA layout for both accumulators); ncu stall reasons of the decode split pass, plain vs LoRA, at a small shape.
python3 -c "import jax; print(jax.__version__, jax.devices())"
timeout 150 python3 scripts/bench_step.py --shape llama-3.1-8b --context 4096 --batch 1 --gemv 1:1,1:2,1:1:triton,2:2:triton --matmul-impl xla,triton --out $OUT 2>&1 | grep -v Warn | tee $OUT/step.log
timeout 200 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 256,16384 --schemes full_shared,base_lr_shared --max-len 66560 --prefill-buckets 64,1024 --attention pallas --no-progress --out $OUT/trace 2>&1 | grep -v Warn | tee $OUT/trace.log
timeout 120 python3 scripts/bench_concurrent.py --shape llama-3.1-8b --context 131072 --agents 1,4,8 --no-sequential --out $OUT 2>&1 | grep -v Warn | tee $OUT/concurrent.log
timeout 80 python3 scripts/probe_decode.py --shapes 1:32k,8:32k --variants plain,mma,wide,mma_nopf --out $OUT 2>&1 | grep -v Warn | tee $OUT/probe.log
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for v in plain mma; do
  timeout 60 ncu --clock-control none -k regex:split -c 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    python3 scripts/probe_decode.py --shapes 8:4k --variants $v --reps 1 > $OUT/ncu_$v.txt 2>&1
  grep -v "^==PROF\|^$" $OUT/ncu_$v.txt | tail -40
done
