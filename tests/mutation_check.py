"""Re-run the mutation checks of docs/testing.md: each mutation is applied to a copy of the
repository (never to the working tree), the test that should catch it runs there, and a line per
mutation says whether it was caught.

    python tests/mutation_check.py            # all
    python tests/mutation_check.py a_ c_      # names starting with these prefixes

Not collected by pytest (no test_ prefix); takes ~1 minute per mutation on 2 CPU cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (file, exact text, replacement, pytest arguments of the tests that must fail)
MUTATIONS = {
    "a_bs_lr_prefill_no_adapter": (
        "lragent_jax/schemes.py", "_start(held_own, active), ids,",
        "_start(held_own, active), np.full_like(ids, -1) if self.name == 'base_shared' else ids,",
        "tests/test_scheme_reference.py -k base_shared"),
    "b_bs_skip_catch_up": (
        "lragent_jax/schemes.py", "        if catch_up.any():\n",
        "        if catch_up.any() and self.name != 'base_shared':\n",
        "tests/test_scheme_reference.py -k base_shared"),
    "c_ds_hidden_one_early": (
        "lragent_jax/cache.py", "jnp.minimum(positions, self.capacity - 1)",
        "jnp.maximum(jnp.minimum(positions, self.capacity - 1) - 1, 0)",
        "tests/test_scheme_reference.py -k droidspeak"),
    "d_no_sliding_window_mask": (
        "pallas_kernels/xla_chunked.py",
        "valid = valid & (cols[None, None, :] > pos[:, :, None] - c.sliding_window)", "valid = valid",
        "tests/test_sliding_window.py tests/test_scheme_reference.py -k 'window'"),
    "e_fs_recomputes": (
        "lragent_jax/schemes.py", "    def _held(self, agent):\n        return self.held\n",
        "    def _held(self, agent):\n        return np.zeros_like(self.held)\n",
        "tests/test_scheme_reference.py -k full_shared"),
    "f_lora_scale_sqrt": (
        "lragent_jax/config.py", "return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)",
        "return self.alpha / self.rank**0.5", "tests/test_scheme_reference.py -k non_shared"),
    "g_lr_term_unscaled": (
        "pallas_kernels/xla_chunked.py", "o = o + c.scale.reshape(b, hkv, g, 1, 1) * lo_term", "o = o + lo_term",
        "tests/test_scheme_reference.py -k base_lr_shared"),
    "h_catch_up_writes_shared": (
        "lragent_jax/schemes.py",
        "_, view = self.engine.prefill(self._view(agent, False), _rows(traj, held_own, caught_up)",
        "_, view = self.engine.prefill(self._view(agent, True), _rows(traj, held_own, caught_up)",
        "tests/test_scheme_reference.py -k 'base_shared or droidspeak'"),
    "i_pallas_drops_lora_scale": (
        "pallas_kernels/flash_lora_attention.py",
        "return fn(c.q, c.k, c.v, c.layer, c.kv_len, c.q_off, c.lr, c.lora_b, c.scale, causal=c.causal,",
        "return fn(c.q, c.k, c.v, c.layer, c.kv_len, c.q_off, c.lr, c.lora_b, c.scale * 0 + 1, causal=c.causal,",
        "tests/test_pallas_model.py"),
    "j_idle_rows_catch_up": (
        "lragent_jax/schemes.py", "T = np.where(active, _lengths(traj), held)  # inactive rows: nothing to process",
        "T = _lengths(traj)", "tests/test_session_rows.py -k non_shared"),
    "k_idle_rows_decode_on": (
        "lragent_jax/schemes.py", "limits = np.where(active, np.broadcast_to(max_new_tokens, active.shape), 1)",
        "limits = np.broadcast_to(max_new_tokens, active.shape)", "tests/test_session_rows.py -k base_lr_shared"),
}


def main(prefixes) -> int:
    names = [n for n in MUTATIONS if not prefixes or n.startswith(tuple(prefixes))]
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "repo")
        for name in names:
            path, old, new, tests = MUTATIONS[name]
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache"))
            file = os.path.join(copy, path)
            text = open(file).read()
            if text.count(old) != 1:
                print(f"{name}: the text to mutate occurs {text.count(old)} times in {path}; update MUTATIONS")
                missed += 1
                continue
            line = text[: text.index(old)].count("\n") + 1
            with open(file, "w") as f:
                f.write(text.replace(old, new))
            env = {**os.environ, "LRAGENT_TEST_JAX_CACHE": os.path.join(tmp, "jax_cache")}
            r = subprocess.run(f"{sys.executable} -m pytest -q -p no:cacheprovider {tests}", shell=True, cwd=copy,
                               env=env, capture_output=True, text=True)
            failed = [ln.split(" ")[1] for ln in r.stdout.splitlines() if ln.startswith("FAILED")]
            if r.returncode != 0 and not failed:  # pytest did not get to the tests: say so, not "not caught"
                tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or [""]
                print(f"{name}: pytest exited {r.returncode} without a failed test ({tail[0]}); run this script "
                      "with the test environment's Python", flush=True)
                missed += 1
                continue
            caught = r.returncode == 1 and failed
            missed += not caught
            print(f"{name} ({path}:{line}): {'caught by ' + ', '.join(failed) if caught else 'NOT CAUGHT'}",
                  flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
