# Optional (#6 leftover, resolved issue): the 131k concurrent point on an 80 GB or larger card.
R=/tmp/r; mkdir -p $R
timeout -k 5 300 python3 scripts/bench_concurrent.py --shape llama-3.1-8b --context 131072 --agents 1,4,8 --no-sequential --out $R > $R/concurrent.log 2>&1
tar czf $OUT/r.tgz -C $R .; grep -v Warn $R/concurrent.log | tail -6
