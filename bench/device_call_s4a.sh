# Session 4, call 4 (#4): does the decode kernel's LoRA cost at batch 8 come from wave
# quantization? ncu (s4 call 3) shows the w32 split pass at b8/4k (block_k 64, stages 3) limited to
# 2 blocks/SM by shared memory (79.9 KB/block) -> 264 slots for 320 programs (5 splits): 1.21 waves.
# Prediction: 4 splits (256 programs, one wave) brings w32 within ~5% of plain at b8.
R=/tmp/r; mkdir -p $R
snap() { tar czf $OUT/r.tgz -C $R .; }
python3 -c "import jax; print(jax.__version__, jax.devices())" > $R/env.txt 2>&1
timeout -k 5 150 python3 scripts/probe_decode.py --shapes 8:4k,8:32k --variants plain,w32 --num-splits 3,4,5,6,8 --out $R/bk64 > $R/probe_bk64.log 2>&1; snap
timeout -k 5 120 python3 scripts/probe_decode.py --shapes 8:4k,8:32k --variants plain,w32 --block-k 128 --num-stages 2 --num-splits 2,3,4,5 --out $R/bk128 > $R/probe_bk128.log 2>&1; snap
timeout -k 5 100 python3 scripts/probe_decode.py --shapes 1:16k,1:32k --variants plain,w32 --num-splits 16,24,33,48 --out $R/b1 > $R/probe_b1.log 2>&1; snap
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout -k 5 60 ncu --clock-control none -k regex:split -c 1 --section LaunchStats --section Occupancy \
  python3 scripts/probe_decode.py --shapes 8:4k --variants w32 --block-k 128 --num-stages 2 --reps 1 > $R/ncu_w32_bk128.txt 2>&1; snap
timeout -k 5 60 ncu --clock-control none -k regex:split -c 1 --section LaunchStats --section Occupancy \
  python3 scripts/probe_decode.py --shapes 8:4k --variants plain --reps 1 > $R/ncu_plain_bk64.txt 2>&1; snap
grep -v Warn $R/probe_bk64.log $R/probe_bk128.log $R/probe_b1.log | grep -v device
grep -hE "Dynamic Shared|Block Limit (Reg|Shared)|Theoretical Occ|Registers Per" $R/ncu_*.txt
