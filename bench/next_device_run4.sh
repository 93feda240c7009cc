# Optional extras: throughput against batch for three schemes in one process (plot
# trace_batch.png), and the 131k concurrent point (#6 leftover, resolved issue).
R=/tmp/r; mkdir -p $R
snap() { tar czf $OUT/r.tgz -C $R .; }
timeout -k 5 400 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 1024 --batch 1,4,16 --schemes non_shared,full_shared,base_lr_shared --max-len 5120 --prefill-buckets 64,1024 --attention pallas --no-progress --out $R/trace-batch > $R/trace-batch.log 2>&1; snap
timeout -k 5 180 python3 scripts/bench_concurrent.py --shape llama-3.1-8b --context 131072 --agents 1,4,8 --no-sequential --out $R > $R/concurrent.log 2>&1; snap
grep -v Warn $R/trace-batch.log | tail -14; grep -v Warn $R/concurrent.log | tail -6
