#!/usr/bin/env python3
"""The decode step under XLA / NCCL runtime settings, one child process per setting (issue 14).

XLA_FLAGS and NCCL variables are read once, when JAX starts its backend, so each setting runs
`python -m bench.sharded` in its own process and this driver collects their JSON:

  python -m bench.decode_flags --shape llama-3.1-8b --context 8192 --mesh model=1 --mesh model=2
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m bench.decode_flags --quick    # CPU smoke

Why these settings (what each tests, measured rather than assumed):
  default       XLA's own choice: command buffers (CUDA graphs) for fusions and library calls,
                split at every collective and at the decode loop's host-side condition;
  cb_coll       --xla_gpu_enable_command_buffer=+COLLECTIVES: the all-reduces recorded into the
                command buffers, so a tensor-parallel step is not 2 L + 1 separate launches;
  cb_while      +WHILE,+CONDITIONAL besides: the whole decode loop one CUDA graph with a
                device-side condition (no host round trip per token; one GPU too);
  cb_all        both;
  nccl_ll       NCCL_PROTO=LL: NCCL's low-latency protocol for the small (tens of KiB) all-reduces;
  lhs           --xla_gpu_enable_latency_hiding_scheduler=true.
NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0) in every child. Prints a table (step ms
per setting and mesh, ratio to the first mesh's default), writes decode_flags.json and
decode_flags.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import results_dir, write_json

SETTINGS = {
    "default": {},
    "cb_coll": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=+COLLECTIVES"},
    "cb_while": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"},
    "cb_all": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=+COLLECTIVES,+WHILE,+CONDITIONAL"},
    "nccl_ll": {"NCCL_PROTO": "LL"},
    "lhs": {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"},
}


def child_env(setting: str) -> dict:
    """The environment of one setting's child: the caller's, NVLS off, the setting's variables;
    the setting's XLA flags are appended to the caller's (e.g. a CPU device count)."""
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"}
    for key, value in SETTINGS[setting].items():
        env[key] = f"{env[key]} {value}".strip() if key == "XLA_FLAGS" and env.get(key) else value
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--mesh", action="append", default=None, metavar="data=D,model=M",
                   help="meshes, each run under every setting (default: model=2)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--timeout", type=int, default=150, help="seconds per setting's child")
    p.add_argument("--quick", action="store_true", help="small context and few tokens (CPU smoke run)")
    p.add_argument("--out", default=None, help="output folder (default results/decode_flags/<timestamp>/)")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        p.error(f"--settings: unknown {unknown or 'none given'}; known: {', '.join(SETTINGS)}")
    meshes = args.mesh or ["model=2"]
    out = results_dir("decode_flags", args.out)
    rows, failures = [], {}
    for setting in settings:
        child_out = os.path.join(out, setting)
        cmd = [sys.executable, "-m", "bench.sharded", "--shape", args.shape, "--context", str(args.context),
               "--batch", args.batch, "--out", child_out, *(x for m in meshes for x in ("--mesh", m))]
        if args.quick:
            cmd.append("--quick")
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=child_env(setting), capture_output=True, text=True, timeout=args.timeout)
            failed = proc.returncode != 0 and (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
        except subprocess.TimeoutExpired:
            failed = f"timed out after {args.timeout} s"
        wall = time.perf_counter() - t
        path = os.path.join(child_out, f"sharded-{args.shape}.json")
        if failed or not os.path.exists(path):
            failures[setting] = failed or "no result file"
            print(f"{setting:>10}: FAILED ({failures[setting]}) after {wall:.0f} s", flush=True)
            continue
        with open(path) as f:
            for r in json.load(f)["rows"]:
                rows.append({"setting": setting, "env": SETTINGS[setting], **r})
                coll = sum(c["count"] for c in r["collectives"].values())
                print(f"{setting:>10} {r['mesh']:>16} B={r['batch']:<3} decode {r['step_ms']:8.3f} ms/step "
                      f"({coll} collectives)  [{wall:.0f} s]", flush=True)
    base = {(r["mesh"], r["batch"]): r["step_ms"] for r in rows if r["setting"] == settings[0]}
    first = {r["batch"]: r["step_ms"] for r in rows if r["setting"] == settings[0] and r["mesh"] == meshes[0]}
    if rows:
        print(f"\n{'setting':>10} {'mesh':>16} {'B':>3} {'ms/step':>9} {'vs ' + settings[0]:>12} "
              f"{'vs ' + meshes[0] + ' ' + settings[0]:>28}")
        for r in rows:
            b0, f0 = base.get((r["mesh"], r["batch"])), first.get(r["batch"])
            vs_setting = r["step_ms"] / b0 if b0 else None  # None (JSON null): the first setting failed
            vs_first = r["step_ms"] / f0 if f0 else None
            r["vs_first_setting"], r["vs_first_mesh_first_setting"] = vs_setting, vs_first
            fmt = lambda x, w: f"{x:{w}.2f}" if x is not None else f"{'-':>{w}}"
            print(f"{r['setting']:>10} {r['mesh']:>16} {r['batch']:>3} {r['step_ms']:9.3f} {fmt(vs_setting, 12)} "
                  f"{fmt(vs_first, 28)}")
    result = {"shape": args.shape, "context": args.context, "meshes": meshes, "settings": settings,
              "rows": rows, "failures": failures, "command": " ".join([os.path.basename(sys.executable),
                                                                      "-m", "bench.decode_flags", *argv])}
    print(f"wrote {write_json(os.path.join(out, 'decode_flags.json'), result)}")
    if rows:
        plot(rows, settings, meshes, os.path.join(out, "decode_flags.png"), args.shape)
    else:  # nothing measured: a failed benchmark, not an empty table
        raise SystemExit(f"error: every setting failed: {failures}")
    return result


def plot(rows, settings, meshes, path, shape):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import save_plot

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(meshes))
    for j, mesh in enumerate(meshes):
        ys = [next((r["step_ms"] for r in rows if r["setting"] == s and r["mesh"] == mesh), 0.0) for s in settings]
        ax.bar([i + j * width for i in range(len(settings))], ys, width, label=mesh)
    ax.set_xticks([i + width * (len(meshes) - 1) / 2 for i in range(len(settings))], settings, fontsize=8)
    ax.set_ylabel("decode step, ms (first batch size)")
    save_plot(fig, [ax], path, f"decode step per runtime setting, {shape}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
