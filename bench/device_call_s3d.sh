# Session 3, device call 4: #5 step time vs its weight products alone (batch 1, 4k);
# #4 bench_kernels decode with the new default (lr_width 32), against gqa and naive.
R=/tmp/r; mkdir -p $R
timeout -k 5 80 python3 scripts/profile_step.py run --shape llama-3.1-8b --context 4096 --new-tokens 17 > $R/step.log 2>&1
timeout -k 5 90 python3 scripts/profile_step.py products --shape llama-3.1-8b > $R/products.log 2>&1
grep -v Warn $R/step.log $R/products.log | tail -4; tar czf $OUT/r.tgz -C $R .
timeout -k 5 280 python3 scripts/bench_kernels.py --only decode --no-tune --check --kv-lens 4k,16k,32k,128k --out $R/kernels > $R/kernels.log 2>&1
tar czf $OUT/r.tgz -C $R .; grep -v Warn $R/kernels.log | tail -45
