"""notebooks/quickstart.ipynb executes on CPU, top to bottom, and shows what it promises.

The notebook runs in a fresh kernel of this Python (nbclient), with this checkout first on
sys.path (so its install cell finds lragent_jax importable and installs nothing) and JAX
pinned to the CPU (its GPU / TPU cells must skip cleanly). About two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import re
import sys

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
CELL_TIMEOUT_S = 300  # per cell; the slowest (the default demo, five schemes; the trace) take ~30-40 s on 2 cores
KERNEL = "lragent-test-python"
SCHEMES = ("non_shared", "base_lr_shared")
# A row of bench.trace.print_table: label, Lctx, batch, total, tput, TTFT, e2e, cache MiB, peak MiB, catch-up
TABLE_ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s+(\d+)\s*$")


def _kernel_spec(folder):
    """A kernelspec for this interpreter (a 'python3' spec elsewhere on the machine may be another Python)."""
    spec_dir = os.path.join(folder, "kernels", KERNEL)
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "lragent test python", "language": "python"}, f)


def _text(cell) -> str:
    """A cell's printed output: streams and plain-text results."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _by_tag(nb) -> dict:
    return {tag: cell for cell in nb.cells for tag in cell.get("metadata", {}).get("tags", [])}


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{NOTEBOOK}: code cells {dirty} carry outputs; strip them before committing"


def test_quickstart_runs_on_cpu(tmp_path, monkeypatch):
    _kernel_spec(str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # also on a GPU machine: its GPU / TPU cells skip, install nothing
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ.get(
        "LRAGENT_TEST_JAX_CACHE", os.path.join(ROOT, ".pytest_cache", "jax")))
    monkeypatch.setenv("LRAGENT_MINIATURE_DIR", str(tmp_path / "no-miniature"))  # the random demo, always

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # allow_errors=False: the first cell that raises fails the test with its traceback.
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL, allow_errors=False,
                   resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert not errors, errors
    cells = _by_tag(nb)

    install = _text(cells["install"])
    assert f"lragent_jax from: {os.path.join(ROOT, 'lragent_jax')}" in install, install
    assert "no NVIDIA GPU in JAX_PLATFORMS: skipped" in _text(cells["gpu-setup"])
    assert "no TPU in JAX_PLATFORMS: skipped" in _text(cells["tpu-setup"])
    assert "backend cpu" in _text(cells["platform"])

    # The default demo: every scheme ran and printed its turns.
    default = _text(cells["default"])
    for scheme in ("non_shared", "full_shared", "droidspeak", "base_shared", "base_lr_shared"):
        assert f"=== scheme {scheme} ===" in default, default[-2000:]
    assert "error" not in default.lower(), default[-2000:]

    # The trace table: both schemes at every Lctx; base_lr_shared recomputes nothing and holds a
    # smaller cache, non_shared catches up on what the other agents wrote.
    rows = {}
    for line in _text(cells["trace"]).splitlines():
        m = TABLE_ROW.match(line.strip())
        if m:
            rows[(m.group(1), int(m.group(2)))] = {"cache_mib": float(m.group(8)), "catch_up": int(m.group(10)),
                                                   "tput": float(m.group(5))}
    lctxs = sorted({lctx for _, lctx in rows})
    assert len(lctxs) == 2 and set(rows) == {(s, n) for s in SCHEMES for n in lctxs}, rows
    for n in lctxs:
        ns, blr = rows[("non_shared", n)], rows[("base_lr_shared", n)]
        assert blr["catch_up"] == 0 < ns["catch_up"], (n, ns, blr)
        assert blr["cache_mib"] < ns["cache_mib"], (n, ns, blr)
        assert ns["tput"] > 0 and blr["tput"] > 0

    plot = cells["plot"]
    assert any("image/png" in o.get("data", {}) for o in plot.outputs if o["output_type"] == "display_data"), \
        "the trace plot cell displayed no image"

    assert "plan tokens: [" in _text(cells["api"])
    concurrent = _text(cells["api-concurrent"])
    assert "'plan': [" in concurrent and "'reflect': [" in concurrent and "log p(' Athens')" in concurrent
    assert "'scheme': 'base_lr_shared'" in concurrent and "'catch_up_tokens': 0" in concurrent
    assert "restored session continues identically: True" in _text(cells["checkpoint"])
