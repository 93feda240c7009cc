# Second ready-made call: the 131k concurrent point (#6 leftover) and the decode kernel's
# register pressure (ncu sections of the split pass at b8/4k for num_warps 4 vs 8).
R=/tmp/r; mkdir -p $R
snap() { tar czf $OUT/r.tgz -C $R .; }
timeout -k 5 170 python3 scripts/bench_concurrent.py --shape llama-3.1-8b --context 131072 --agents 1,4,8 --no-sequential --out $R > $R/concurrent.log 2>&1; snap
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for w in 4 8; do
  timeout -k 5 90 ncu --clock-control none -k regex:split -c 1 --section SpeedOfLight --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    python3 scripts/probe_decode.py --shapes 8:4k --variants w32 --num-warps $w --reps 1 > $R/ncu_w32_warps$w.txt 2>&1; snap
done
timeout -k 5 120 python3 scripts/probe_decode.py --shapes 1:16k,8:32k --variants plain,w32 --num-warps 8 --out $R > $R/probe_warps8.log 2>&1; snap
grep -v Warn $R/concurrent.log | tail -6; cat $R/probe_warps8.log | grep -v Warn | tail -6
