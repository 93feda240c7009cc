#!/bin/bash
# Session 7, call 2 on nvidia-h200: train the miniature (issue 13).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
S=$(date +%s); mkdir -p /tmp/train /root/keep
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpus.txt
timeout 578 python3 scripts/train_miniature.py --archive /tmp/train/miniature.tar.gz --time-limit 570 > $OUT/train_stdout.log 2>&1
echo "train rc=$? at $(($(date +%s)-S))s" >> $OUT/train_stdout.log
tail -30 $OUT/train_stdout.log
[ -f /tmp/train/miniature.tar.gz ] && split -b 15M /tmp/train/miniature.tar.gz $OUT/miniature.tgz.part_ && cp /tmp/train/miniature.tar.gz /root/keep/
ls -la $OUT
