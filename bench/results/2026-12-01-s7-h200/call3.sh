#!/bin/bash
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
S=$(date +%s); mkdir -p $OUT/ev
python3 scripts/train_miniature.py --install-from /root/keep/miniature.tar.gz > $OUT/ev/install.log 2>&1 || { cat $OUT/ev/install.log; exit 1; }
E="python3 scripts/eval_agents.py --miniature --questions 500 --batch 128 --no-progress"
timeout 200 $E --configs non_shared,base_lr_shared,base_shared --out $OUT/ev/e1 > $OUT/ev/e1.log 2>&1; echo "e1 rc=$? $(($(date +%s)-S))s"
head -5 $OUT/ev/e1.log; grep -A6 "^configuration" $OUT/ev/e1.log | head -8
timeout 250 python3 -m bench.gpu_mgpu_check --out $OUT/ev/mgpu > $OUT/ev/mgpu.log 2>&1; echo "mgpu rc=$? $(($(date +%s)-S))s"
R=$((560-($(date +%s)-S))); [ $R -gt 50 ] && timeout $R $E --configs full_shared,droidspeak --similarity-questions 0 --out $OUT/ev/e2 > $OUT/ev/e2.log 2>&1; echo "e2 $(($(date +%s)-S))s"
grep -A4 "^configuration" $OUT/ev/e2.log | head -5; tail -40 $OUT/ev/mgpu.log
cd $OUT && tar czf ev.tgz ev && rm -rf ev
