# Session 3, device call 2: #4 LR tile width (wide=128 vs 32 vs 64) at the bench shapes;
# #5 per-kernel profile of the batch-1 decode step (ncu); #6 the 131k concurrent point.
R=/tmp/r; mkdir -p $R
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee $R/env.txt
timeout 150 python3 scripts/probe_decode.py --shapes 1:16k,1:32k,1:128k,8:4k,8:32k --variants plain,wide,w32,w64 --out $R 2>&1 | grep -v Warn | tee $R/probe.log
timeout 60 python3 scripts/profile_step.py run --shape llama-3.1-8b --context 4096 2>&1 | grep -v Warn | tee $R/step_plain.log
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 ncu --profile-from-start off --clock-control none --csv --print-units base \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum --log-file $R/step_ncu.csv \
  python3 scripts/profile_step.py run --shape llama-3.1-8b --context 4096 2>&1 | grep -v Warn | tail -5
python3 scripts/profile_step.py summarize $R/step_ncu.csv --steps 4 --top 30 --json $R/step_profile.json
timeout 170 python3 scripts/bench_concurrent.py --shape llama-3.1-8b --context 131072 --agents 1,4,8 --no-sequential --out $R 2>&1 | grep -v Warn | tee $R/concurrent.log
tar czf $OUT/r.tgz -C $R .
