"""Merging attention over disjoint key ranges with log-sum-exp weights.

Concurrent agents decoding on one shared prefix (docs/design.md section 1):

1. the prefix is attended ONCE for all agents, their queries stacked as extra
   query heads of each KV head (``stack_query_heads``; per-query-head lora_b
   [B, N*Hq, r, D] and lora_scale [B, N*Hq] carry each agent's LoRA), with
   ``return_lse=True``;
2. each agent's own suffix is attended separately, also with ``return_lse``;
3. ``merge_partials`` combines the two parts per agent.

The merge is exact for Flash-LoRA outputs that already include each part's
LoRA term: per part i, O_i = P_i V_base + s (P_i LR) B with P_i the softmax
over part i's keys, and the softmax over the union of disjoint key ranges is
P = sum_i exp(lse_i - L) P_i (L = logaddexp of the lse_i). O is linear in P
(B and s are the same in every part), so O = sum_i exp(lse_i - L) O_i.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp


def merge_partials(outs: Sequence, lses: Sequence):
  """Merges attention results over disjoint key ranges.

  Args:
    outs: N >= 1 arrays [..., D] (e.g. [batch, q_len, heads_q, head_dim]), the
      attention outputs of the parts (0 where a part sees no key).
    lses: N arrays [...] (out.shape[:-1]), each part's log-sum-exp as returned
      by ``flash_lora_attention(..., return_lse=True)`` (-inf: no visible key).

  Returns:
    (out, lse): out = sum_i exp(lse_i - L) out_i in the first out's dtype, and
    lse = L = logaddexp over i (float32). Parts with lse -inf contribute 0
    (whatever their out holds); rows where every part is -inf give out 0 and
    lse -inf. Computed in float32.

  Exact for Flash-LoRA outputs that include each part's LoRA term, because
  out = P V_base + s (P LR) B is linear in the softmax P (see module doc).
  """
  outs, lses = list(outs), list(lses)
  if not outs or len(outs) != len(lses):
    raise ValueError(f"merge_partials needs N >= 1 outs and as many lses, got "
                     f"{len(outs)} outs and {len(lses)} lses.")
  for o, l in zip(outs, lses):
    if tuple(o.shape) != tuple(outs[0].shape) or tuple(l.shape) != tuple(o.shape[:-1]):
      raise ValueError(
          f"every out must have shape {tuple(outs[0].shape)} and every lse its "
          f"shape[:-1] {tuple(outs[0].shape[:-1])}; got out {tuple(o.shape)}, lse {tuple(l.shape)}.")
  dtype = outs[0].dtype
  lse = jnp.stack([jnp.asarray(l, jnp.float32) for l in lses])          # [N, ...]
  m = jnp.max(lse, axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)                           # all -inf -> 0
  w = jnp.exp(lse - m_safe)                                             # -inf part -> 0
  den = jnp.sum(w, axis=0)
  acc = sum(jnp.where(w[i][..., None] > 0, w[i][..., None] * jnp.asarray(o, jnp.float32), 0.0)
            for i, o in enumerate(outs))
  inv = jnp.where(den > 0, 1.0 / jnp.where(den > 0, den, 1.0), 0.0)
  out = (acc * inv[..., None]).astype(dtype)
  lse_out = jnp.where(den > 0, m_safe + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
  return out, lse_out


def merge_attention(o1, lse1, o2, lse2):
  """Two-part ``merge_partials``: returns (out, lse)."""
  return merge_partials((o1, o2), (lse1, lse2))


def stack_query_heads(xs: Sequence, heads_kv: int, axis: int = 2):
  """Stacks N agents' per-query-head arrays as extra query heads.

  The kernels map query head h to KV head h // G (G = heads per KV head), so
  agent n's head h (KV head h // G_agent) must land inside KV head h // G_agent's
  group: the stacked head axis is ordered (kv head, agent, g). Works for q / out
  [B, T, Hq, D] (axis 2), lora_b [B, Hq, r, D] and lora_scale [B, Hq] (axis 1),
  lse [B, T, Hq] (axis 2). With heads_kv == 1 (MQA) this is plain concatenation.
  Inverse: ``split_query_heads``.
  """
  xs = [jnp.asarray(x) for x in xs]
  x0 = xs[0]
  axis = axis % x0.ndim
  hq = x0.shape[axis]
  if hq % heads_kv:
    raise ValueError(f"heads ({hq}) must be a multiple of heads_kv ({heads_kv}).")
  g = hq // heads_kv
  grouped = [x.reshape(x.shape[:axis] + (heads_kv, 1, g) + x.shape[axis + 1:]) for x in xs]
  st = jnp.concatenate(grouped, axis=axis + 1)                 # [..., Hkv, N, G, ...]
  return st.reshape(x0.shape[:axis] + (heads_kv * len(xs) * g,) + x0.shape[axis + 1:])


def split_query_heads(x, num_agents: int, heads_kv: int, axis: int = 2):
  """Inverse of ``stack_query_heads``: returns the list of N per-agent arrays."""
  x = jnp.asarray(x)
  axis = axis % x.ndim
  h = x.shape[axis]
  if h % (heads_kv * num_agents):
    raise ValueError(f"heads ({h}) must be a multiple of heads_kv * num_agents "
                     f"({heads_kv} * {num_agents}).")
  g = h // (heads_kv * num_agents)
  xr = x.reshape(x.shape[:axis] + (heads_kv, num_agents, g) + x.shape[axis + 1:])
  return [jnp.take(xr, n, axis=axis + 1).reshape(x.shape[:axis] + (heads_kv * g,) + x.shape[axis + 1:])
          for n in range(num_agents)]
