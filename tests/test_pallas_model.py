"""The whole model with Pallas attention kernels (interpret mode on CPU) equals the XLA path, for
every scheme, over a short multi-agent trajectory: greedy tokens identical, teacher-forced logits
within tolerance.

Session(attention="pallas") calls pallas_kernels.flash_lora_attention with backend "auto", which
off GPU/TPU resolves to the kernels' jnp reference, not a Pallas kernel. So the test wraps that
entry to run the Triton kernels (prefill and split-K decode) in interpret mode, and counts the
calls, so it cannot pass through XLA.

Tolerance: float32 on both paths; the kernels' online softmax sums in another order than XLA's
softmax (~1e-7 relative per attention), observed < 1e-5 of the largest |logit|; REL_TOL = 1e-4.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np
import pytest

import scheme_reference as ref_lib
from test_scheme_reference import CRITICAL, PROMPT, TOOL, case  # noqa: F401  (the module fixture)

REL_TOL = 1e-4
TURNS = (("plan", 4), ("action", 3), ("plan", 3))
SCORE = ("reflect", [40, 41, 200])


KERNEL_CALLS = []  # traces of the patched entry (a program traced once is reused by later tests)


@pytest.fixture(scope="module", autouse=True)
def pallas_interpret():
    """For this module, attention="pallas" runs the Triton kernels in Pallas interpret mode. The
    engines (from the module-scoped `case`) are this module's own, so every "pallas" program they
    compile is traced under this patch."""
    # the module (pallas_kernels/__init__ re-exports a function of the same name)
    fla = importlib.import_module("pallas_kernels.flash_lora_attention")
    original = fla.flash_lora_attention

    @functools.wraps(original)
    def kernel(*args, **kw):
        KERNEL_CALLS.append(1)
        return original(*args, **{**kw, "backend": "triton", "interpret": True})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fla, "flash_lora_attention", kernel)
        # lragent_jax.attention binds the entry point at import: patch the name it calls too
        mp.setattr(importlib.import_module("lragent_jax.attention"), "flash_lora_attention", kernel)
        yield


def run(case, scheme, attention):
    from lragent_jax.session import Session

    engine = case["engines"][scheme == "base_lr_shared"]
    s = Session(engine, scheme, max_len=64, stop_ids=(), critical_layers=CRITICAL, attention=attention)
    s.append(PROMPT)
    tokens = []
    for i, (agent, n) in enumerate(TURNS):
        tokens.append(s.generate(agent, n, greedy=True)[0])
        s.append(TOOL[i])
    return tokens, s.score(*SCORE)[0]


@pytest.mark.parametrize("scheme", ref_lib.SCHEMES)
def test_pallas_interpret_equals_xla(case, scheme):
    tokens, logits = run(case, scheme, "pallas")
    assert KERNEL_CALLS, "the Pallas kernels were never traced"
    want_tokens, want_logits = run(case, scheme, "xla")
    assert tokens == want_tokens, scheme
    assert all(len(set(t)) >= 2 for t in want_tokens), want_tokens
    err = np.abs(logits - want_logits).max()
    assert err <= REL_TOL * np.abs(want_logits).max(), f"{scheme}: max |diff| {err:.3g}"
