# Second ready-made call (#4): kernels re-tuned with the 32-wide LR tile (decode and prefill),
# and the decode split pass's register pressure (ncu occupancy at b8/4k, 4 vs 8 warps).
R=/tmp/r; mkdir -p $R
snap() { tar czf $OUT/r.tgz -C $R .; }
timeout -k 5 220 python3 scripts/bench_kernels.py --check --kv-lens 4k,32k,128k --out $R/kernels > $R/kernels.log 2>&1; snap
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for w in 4 8; do
  timeout -k 5 80 ncu --clock-control none -k regex:split -c 1 --section SpeedOfLight --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    python3 scripts/probe_decode.py --shapes 8:4k --variants w32 --num-warps $w --reps 1 > $R/ncu_w32_warps$w.txt 2>&1; snap
done
timeout -k 5 100 python3 scripts/probe_decode.py --shapes 1:16k,8:32k --variants plain,w32 --num-warps 8 --out $R > $R/probe_warps8.log 2>&1; snap
grep -v Warn $R/kernels.log | tail -40; grep -v Warn $R/probe_warps8.log | tail -6
