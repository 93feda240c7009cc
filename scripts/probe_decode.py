#!/usr/bin/env python
"""Where the Flash-LoRA decode kernel's LoRA time goes: time the two passes apart.

The split-K decode is two kernels: the split pass (streams K, V_base and LR,
writes per-split partials) and the merge (log-sum-exp merge of the splits,
then the rank-wide partial times B). For each (batch, kv_len) this times,
in one run on one device, with bench_kernels' timer (one executable, rotated
inputs, median):

  full / split / merge  x  plain (no LoRA) | mma (P @ LR on tensor cores, LR
  padded to 16 columns by masked loads) | fma (P @ LR on CUDA cores, LR tile
  rank wide) | mma16 (rank 16: a tensor-core dot with no masked columns);
  *_nopf: each LR tile loaded in its own iteration instead of one block ahead;
  wide (LR padded to the head dim: P @ LR in P @ V's MMA layout)
  w32 / w64 (LR padded to 32 / 64 columns: lr_width)

so the LoRA overhead splits into pass and cause by differences.

  python scripts/probe_decode.py --out /tmp/probe            # GPU
  python scripts/probe_decode.py --quick                     # CPU, interpret mode
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import triton_kernels as tk  # noqa: E402
from pallas_kernels._args import canonicalize  # noqa: E402
from lragent_jax.cli import UsageError, positive_int_list  # noqa: E402
from scripts import bench_kernels as bk  # noqa: E402


# name -> (rank of the LR it reads (0: no LoRA), lora_dot, lr_prefetch, lr_width)
VARIANTS = {"plain": (0, None, True, None), "mma": (8, "mma", True, 16), "fma": (8, "fma", True, None),
            "mma16": (16, "mma", True, 16), "mma_nopf": (8, "mma", False, 16),
            "fma_nopf": (8, "fma", False, None), "wide": (8, "wide", False, None),
            "w32": (8, "mma", False, 32), "w64": (8, "mma", False, 64)}


def decode_fn(cfg, dot, prefetch, width, interpret, split_only):
  """The decode kernel on public-layout inputs (lora scale 2): whole, or only its split pass."""
  def run(q, k, v, lr, lb):
    c = canonicalize(q, k, v, lr, lb, lora_scale=2.0)
    return tk.decode(c.q, c.k, c.v, c.layer, c.kv_len, c.q_off, c.lr, c.lora_b, c.scale,
                     causal=True, sm_scale=c.sm_scale, interpret=interpret, split_only=split_only,
                     lora_dot=dot, lr_prefetch=prefetch, lr_width=width, **cfg)
  return run


def splits_for(b, kv, block_k, waves):
  """Split count for `waves` programs per SM (rounded up); waves None -> None."""
  if waves is None:
    return None
  want = math.ceil(waves * tk.num_sms() / (b * bk.HKV))
  return int(max(1, min(want, max(1, -(-kv // block_k) // 2))))


def parse_shapes(text):
  """'1:16k,8:32k' -> [(1, 16384), (8, 32768)]."""
  try:
    out = [(int(b), bk.parse_lens(kv)[0]) for b, kv in (item.split(":") for item in text.split(","))]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected batch:kv items like 1:16k,8:32k, got {text!r}") from None
  if any(b < 1 or kv < 1 for b, kv in out):
    raise argparse.ArgumentTypeError(f"batch and kv must be >= 1, got {text!r}")
  return out


def parse_variants(text):
  names = text.split(",")
  bad = [n for n in names if n not in VARIANTS]
  if bad:
    raise argparse.ArgumentTypeError(f"unknown variants {bad}; choose from {','.join(VARIANTS)}")
  return names


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--shapes", type=parse_shapes, default=None, help="batch:kv list, e.g. 1:16k,8:32k")
  ap.add_argument("--variants", type=parse_variants, default=list(VARIANTS), help="subset of " + ",".join(VARIANTS))
  ap.add_argument("--block-k", type=int, default=64)
  ap.add_argument("--num-warps", type=int, default=4)
  ap.add_argument("--num-stages", type=int, default=3)
  ap.add_argument("--waves", type=int, default=None,
                  help="programs per SM, rounded up to whole splits (default: the kernel's own split count)")
  ap.add_argument("--num-splits", default=None,
                  help="comma list of split counts to sweep (overrides --waves), e.g. 3,4,5")
  ap.add_argument("--reps", type=int, default=None)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  if args.block_k < 16 or args.block_k & (args.block_k - 1):
    ap.error(f"--block-k must be a power of two >= 16, got {args.block_k}")
  if args.num_warps not in (1, 2, 4, 8, 16):
    ap.error(f"--num-warps must be one of 1, 2, 4, 8, 16, got {args.num_warps}")
  try:
    split_list = positive_int_list(args.num_splits, "--num-splits") if args.num_splits is not None else [None]
  except UsageError as e:
    ap.error(str(e))
  for name in ("num_stages", "waves", "reps"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1")
  interpret = jax.default_backend() == "cpu"
  shapes = args.shapes or parse_shapes("1:256,2:512" if args.quick else "1:16k,1:32k,8:32k,8:128k")
  timer = bk.Timer(args.reps or (2 if args.quick else 15))
  print(f"device {bk.device_info()}", flush=True)
  recs = []
  print(f"{'batch':>5} {'kv':>6} {'splits':>6} {'variant':>7} {'full us':>9} {'split us':>9} {'merge us':>9} {'GB/s':>7}")
  for b, kv in shapes:
    n_rot = bk.n_rotations(bk.decode_bytes(b, kv, True))
    rots8 = bk.decode_inputs(b, kv, n_rot)
    for ns, name in [(n, v) for n in split_list for v in args.variants]:
      rank, dot, pf, width = VARIANTS[name]
      tiles = dict(block_k=args.block_k, num_warps=args.num_warps, num_stages=args.num_stages)
      ns = ns or splits_for(b, kv, args.block_k, args.waves)
      if ns is None:  # the kernel's own split count for this variant's tiles
        ns = bk.resolved_decode_cfg(b, kv, tiles, rank, dot, width)["num_splits"]
      cfg = dict(tiles, num_splits=ns)
      if rank == 16:
        rots = [(q, k, v, jnp.concatenate([lr, lr], -1), jnp.concatenate([lb, lb], -2) * 0.5)
                for q, k, v, lr, lb in rots8]
      else:
        rots = [(q, k, v, lr if rank else None, lb if rank else None) for q, k, v, lr, lb in rots8]
      nbytes = bk.decode_bytes(b, kv, bool(rank))
      est = bk.est_decode_s(nbytes, args.quick)
      t_full, _ = timer(decode_fn(cfg, dot, pf, width, interpret, False), rots, est_s=est)
      t_split, _ = timer(decode_fn(cfg, dot, pf, width, interpret, True), rots, est_s=est)
      # Merge alone on this variant's partials.
      parts = jax.jit(decode_fn(cfg, dot, pf, width, interpret, True))(*rots[0])
      opart, rpart, lse = parts
      lb = rots[0][4]
      hq = rots[0][0].shape[2]

      def merge_only(op, rp, ls, lbm, _hq=hq, _d=rots[0][0].shape[3]):
        c_scale = jnp.full((op.shape[0], _hq), 2.0, jnp.float32)
        return tk.merge(op, rp, ls, lbm, c_scale, tq=1, hq=_hq, d=_d, out_dtype=jnp.bfloat16,
                        interpret=interpret)
      t_merge, _ = timer(merge_only, [(opart, rpart, lse, lb)], est_s=1e-5 if not args.quick else None)
      rec = dict(batch=b, kv_len=kv, variant=name, num_splits=ns, full_s=t_full, split_s=t_split,
                 merge_s=t_merge, bytes=nbytes, config=cfg)
      recs.append(rec)
      print(f"{b:5d} {bk.fmt_len(kv):>6} {ns:6d} {name:>7} {t_full * 1e6:9.1f} {t_split * 1e6:9.1f} "
            f"{t_merge * 1e6:9.1f} {nbytes / t_full / 1e9:7.1f}", flush=True)
    del rots8, rots
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_decode.json"), "w") as f:
      json.dump(dict(device=bk.device_info(), jax=jax.__version__, records=recs), f, indent=1)


if __name__ == "__main__":
  main()
