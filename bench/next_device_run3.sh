# Third ready-made call (#5 item 1, what the trace sweep still lacks): Lctx 2048 for all five
# schemes (never run), and droidspeak at 16384 (its session-2 row had a compile in the timing).
R=/tmp/r; mkdir -p $R
snap() { tar czf $OUT/r.tgz -C $R .; }
timeout -k 5 330 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 2048 --schemes all --max-len 66560 --prefill-buckets 64,1024 --attention pallas --no-progress --out $R/trace2048 > $R/trace2048.log 2>&1; snap
timeout -k 5 200 python3 scripts/bench_trace.py --shape llama-3.1-8b --lctx 256,16384 --schemes droidspeak --max-len 66560 --prefill-buckets 64,1024 --attention pallas --no-progress --out $R/trace-ds > $R/trace-ds.log 2>&1; snap
grep -v Warn $R/trace2048.log | tail -12; grep -v Warn $R/trace-ds.log | tail -6
