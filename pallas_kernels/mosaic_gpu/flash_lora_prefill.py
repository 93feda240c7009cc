"""Pallas Mosaic GPU (Hopper, sm90) prefill kernel of Flash-LoRA-Attention.

After JAX 0.11.2's jax/experimental/pallas/ops/gpu/attention_mgpu.py (FlashAttention-3
style): one program holds two compute warpgroups of ``block_q`` query rows each and
one memory warpgroup that streams K, V_base and LR tiles by TMA through
``num_stages`` shared-memory buffers; q k^T and P V run as wgmma with the softmax of
one warpgroup overlapping the matmuls of the other (the schedule barrier). Changes:

* any 16-bit dtype: the shared-memory tiles take q's dtype (the example hard-codes
  float16, so bfloat16 failed with 'Expected dtypes to match');
* the LoRA term: a second accumulator racc [block_q, Rp] += P @ LR rides in the same
  wgmma group as P @ V_base (LR tile [block_k, Rp], Rp = rank padded to 16/32/64);
  the epilogue adds scale * (racc / l) @ B_h as one more wgmma (B_h [Rp, D] loaded
  once by the memory warpgroup). With lr_pad 8, ranks <= 8 use an 8-column LR tile
  (P @ LR at N = 8: 8 / 256 instead of 16 / 256 extra MMA work per key block next to
  q k^T and P V at N = 128 each); it is stored K-major ([8, block_k], LR transposed by
  the wrapper: 16-byte rows have no swizzle wgmma takes) and the product fills the first
  8 columns of a 16-column racc (the epilogue wgmma needs K = 16; B's rows 8-15 are 0);
* the contract of the other backends: sm_scale, ragged kv_lengths and q_offsets
  (a block is masked only where it straddles the causal diagonal or kv_len; blocks
  past both are never computed), GQA, layer index read inside the kernel (stacked
  caches are never copied when the rank is 16/32/64), rows that see no key give 0
  and lse -inf, return_lse (natural log), heaviest causal q tiles scheduled first.

Supported calls (``unsupported_reason`` says why not; the entry point then runs the
Triton kernel): q/k/v_base one dtype of bfloat16 / float16, head_dim a multiple of
64 up to 256, rank <= 64, kv_len a multiple of 64. q_len is padded to a multiple of
2 * block_q here (a copy of q only).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mosaic_gpu.tuning import PrefillBlockSizes, lora_rows, lr_width

try:  # Never at package import time (flash_lora_attention imports this file lazily), and
  # never fatal: JAX versions without Mosaic GPU keep the other backends.
  from jax.experimental.pallas import mosaic_gpu as plgpu
  _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover
  plgpu = None
  _IMPORT_ERROR = f"{type(e).__name__}: {e}"

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite start of the running max: with masked scores at -inf, a row that sees no key
# in a block keeps a finite max, so alpha = exp2(m_old - m_new) is never inf - inf.
M_INIT = -1e30
COMPUTE_WGS = 2
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def interpret_available() -> bool:
  """Whether this JAX has Pallas' GPU interpret mode (JAX >= 0.11)."""
  return plgpu is not None and hasattr(plgpu, "InterpretGPUParams")


@functools.lru_cache(maxsize=1)
def _cuda_runtime_version() -> int | None:
  try:
    from jax._src.lib import cuda_versions
    return None if cuda_versions is None else int(cuda_versions.cuda_runtime_get_version())
  except Exception:  # pragma: no cover
    return None


def unsupported_reason(c) -> str | None:
  """None when this kernel runs the canonical call `c` (_args.Canon), else why not."""
  cuda = _cuda_runtime_version()
  if cuda is not None and 12080 <= cuda < 12091:
    # JAX's attention_mgpu refuses masking there too: ptxas miscompiles it.
    return f"CUDA runtime {cuda} (12.8.0 to 12.9.0: a ptxas miscompilation of masked attention)"
  dims = c.dims
  dt = jnp.dtype(c.q.dtype)
  if dt not in SUPPORTED_DTYPES:
    return f"dtype {dt} (mosaic_gpu runs bfloat16 / float16)"
  if jnp.dtype(c.k.dtype) != dt or jnp.dtype(c.v.dtype) != dt:
    return "q, k and v_base differ in dtype"
  if dims["D"] % 64 or dims["D"] > 256:
    return f"head_dim {dims['D']} (mosaic_gpu needs a multiple of 64 up to 256)"
  if c.has_lora and dims["R"] > 64:
    return f"rank {dims['R']} > 64"
  if dims["S"] % 64:
    return f"kv_len (cache length) {dims['S']} is no multiple of 64"
  return None


def _kernel(*refs, has_lora, return_lse, causal, qk_scale, block_q, block_k, stages,
            d, rp, lr_cols, group, per_q_b, lr_layered, nq, dtype, staged):
  if has_lora:
    layer_ref, kvlen_ref, qoff_ref, q_ref, k_ref, v_ref, lr_ref, b_ref, scale_ref, \
        out_ref, lse_ref, scoped = refs
  else:
    layer_ref, kvlen_ref, qoff_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped = refs
    lr_ref = b_ref = scale_ref = None
  smem, (k_bar, v_bar, q_bar, b_bar), (k_used, v_used), schedule_bar = scoped
  qo_smem2, k_smem, v_smem, lr_smem, b_smem, lse_smem2, stage_smem2 = smem

  batch = lax.axis_index("batch")
  q_head = lax.axis_index("heads")
  tile = (nq - 1) - lax.axis_index("q_seq")        # heaviest causal tiles first
  wg = lax.axis_index("wg")
  kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))
  layer = layer_ref[0]
  kv_len = kvlen_ref[batch]
  q_off = qoff_ref[batch]

  def kv_steps_of(row0):
    """(blocks any of rows [row0, row0 + block_q) sees, leading blocks all of them see fully)."""
    if causal:
      hi = jnp.minimum(kv_len, q_off + row0 + block_q)
      full = jnp.minimum(kv_len, q_off + row0 + 1)
    else:
      hi = full = kv_len
    hi = jnp.maximum(hi, 0)
    full = jnp.maximum(full, 0)
    return lax.div(hi + (block_k - 1), jnp.array(block_k, jnp.int32)), lax.div(full, jnp.array(block_k, jnp.int32))

  # The memory warpgroup streams what the later (second) warpgroup needs.
  max_steps, _ = kv_steps_of(tile * (2 * block_q) + block_q)

  def schedule_barrier():
    plgpu.barrier_arrive(schedule_bar)
    plgpu.barrier_wait(schedule_bar)

  def mma(pairs, before_wait=None):
    """acc_i + a_i @ b_i for (acc_i, a_i, b_i[, n_i]) in pairs, a_i in registers, as one
    wgmma group (one wait); with n_i the product fills only acc_i's first n_i columns.
    staged (GPU interpret mode, which has neither register operands nor pl.run_state):
    each a_i goes through shared memory and each product is added."""
    pairs = [tuple(pr) + (None,) * (4 - len(pr)) for pr in pairs]
    into = lambda ref, n: ref if n is None else ref.at[:, pl.ds(0, n)]
    if not staged:
      def body(refs):
        for ref, (_, a, b, n) in zip(refs, pairs):
          plgpu.wgmma(into(ref, n), a, b)
        if before_wait is not None:
          before_wait()
      return pl.run_state(body)(tuple(plgpu.ACC.init(x) for x, _, _, _ in pairs))
    outs = []
    p_stage2, lora_stage2 = stage_smem2
    for i, (x, a, b, n) in enumerate(pairs):
      a_smem = (p_stage2 if a.shape[-1] == block_k else lora_stage2).at[wg]
      a_smem[...] = a
      plgpu.commit_smem()

      def body(ref, a_smem=a_smem, b=b, n=n, last=i == len(pairs) - 1):
        plgpu.wgmma(into(ref, n), a_smem, b)
        if last and before_wait is not None:
          before_wait()
        return ref[...]
      outs.append(x + pl.run_scoped(body, plgpu.ACC(x.shape, jnp.float32)))
    return tuple(outs)

  @pl.when(wg < COMPUTE_WGS)
  def _compute_wg():
    plgpu.set_max_registers(232, action="increase")
    qo_smem = qo_smem2.at[wg]
    row0 = tile * (2 * block_q) + wg * block_q
    kv_steps, full_steps = kv_steps_of(row0)
    full_steps = jnp.minimum(full_steps, kv_steps)

    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, block_q), q_head], qo_smem, q_bar.at[wg])
    plgpu.barrier_wait(q_bar.at[wg])

    m_i = plgpu.layout_cast(jnp.full((block_q,), M_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((block_q, d), 0, jnp.float32), plgpu.Layout.WGMMA)
    racc = (plgpu.layout_cast(jnp.full((block_q, rp), 0, jnp.float32), plgpu.Layout.WGMMA)
            if has_lora else None)

    @pl.when(kv_steps > 0)
    def _():
      plgpu.barrier_wait(k_bar.at[0])

    pl.when(wg == 1)(schedule_barrier)

    def kv_loop(step, carry, masked=False):
      acc, racc, m_i, l_i = carry
      slot = lax.rem(step, jnp.array(stages, step.dtype))

      def compute_qk(acc_ref):
        plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
        schedule_barrier()
        return acc_ref[...]
      qk = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_k), jnp.float32))
      plgpu.barrier_arrive(k_used.at[slot])

      if masked:
        rows = plgpu.broadcasted_iota(jnp.int32, (block_q, block_k), 0, layout=plgpu.Layout.WGMMA)
        cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_k), 1, layout=plgpu.Layout.WGMMA)
        cols = cols + step * block_k
        ok = cols < kv_len
        if causal:
          ok = ok & (cols <= rows + (q_off + row0))
        qk = jnp.where(ok, qk, -jnp.inf)

      # Log2 domain with sm_scale folded in: p = exp2(qk * qk_scale - m) is one FMA.
      m_ij = jnp.maximum(m_i, qk.max(axis=1) * qk_scale)
      alpha = jnp.exp2(m_i - m_ij)
      m_i = m_ij
      p = jnp.exp2(qk * qk_scale - lax.broadcast_in_dim(m_ij, qk.shape, [0]))
      acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
      if has_lora:
        racc *= lax.broadcast_in_dim(alpha, racc.shape, [0])
      l_i *= alpha
      p16 = p.astype(dtype)

      def end_softmax_barriers():
        plgpu.barrier_arrive(schedule_bar)   # done with the softmax
        plgpu.barrier_wait(v_bar.at[slot])   # V and (with LoRA) LR of this slot
        plgpu.barrier_wait(schedule_bar)     # the tensor cores are free

      # The example's ordering (it measured this to matter).
      if d <= 128:
        l_i += p.sum(axis=1)
        if has_lora:
          acc, racc, l_i, m_i, p16 = lax.optimization_barrier((acc, racc, l_i, m_i, p16))
        else:
          acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
        end_softmax_barriers()
      else:
        end_softmax_barriers()
        l_i += p.sum(axis=1)

      def wait_next_k():
        nxt = step + 1
        nxt_slot = lax.rem(nxt, jnp.array(stages, step.dtype))

        @pl.when(nxt < kv_steps)
        def _():
          plgpu.barrier_wait(k_bar.at[nxt_slot])

      # P @ V_base and P @ LR in one wgmma group: a single wait for both.
      if has_lora:
        if lr_cols == rp:
          lr_pair = (racc, p16, lr_smem.at[slot])
        else:   # K-major [lr_cols, block_k] tile into racc[:, :lr_cols]
          lr_pair = (racc, p16, lr_smem.at[slot].transpose((1, 0)), lr_cols)
        acc, racc = mma([(acc, p16, v_smem.at[slot]), lr_pair], wait_next_k)
      else:
        (acc,) = mma([(acc, p16, v_smem.at[slot])], wait_next_k)
      plgpu.barrier_arrive(v_used.at[slot])   # V and LR of this slot
      return acc, racc, m_i, l_i

    def drain_loop(step, _):
      # Blocks the other warpgroup still needs: release the buffers and keep the
      # schedule barrier in step with it. Waiting for the (unused) data keeps every
      # thread's barrier phases in step (GPU interpret mode checks it; free here).
      slot = lax.rem(step, jnp.array(stages, step.dtype))
      plgpu.barrier_wait(k_bar.at[slot])
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_arrive(k_used.at[slot])
      plgpu.barrier_arrive(v_used.at[slot])
      schedule_barrier()
      schedule_barrier()

    carry = (acc, racc, m_i, l_i)
    carry = lax.fori_loop(0, full_steps, kv_loop, carry)
    carry = lax.fori_loop(full_steps, kv_steps, functools.partial(kv_loop, masked=True), carry)
    lax.fori_loop(kv_steps, max_steps, drain_loop, None)
    acc, racc, m_i, l_i = carry
    pl.when(wg == 0)(schedule_barrier)

    seen = l_i > 0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l_i, 1.0), 0.0)    # no visible key -> 0
    out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
    if has_lora:
      plgpu.barrier_wait(b_bar.at[0])
      lora_in = racc * lax.broadcast_in_dim(inv * scale_ref[batch, q_head], racc.shape, [0])
      lora16 = lora_in.astype(dtype)

      (out,) = mma([(out, lora16, b_smem)])
    qo_smem[...] = out.astype(dtype)
    if return_lse:
      lse_smem = lse_smem2.at[wg]
      log2_l = jnp.log(jnp.where(seen, l_i, 1.0)) * (1.0 / LN2)
      lse_smem[...] = jnp.where(seen, (m_i + log2_l) * LN2, -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(row0, block_q), q_head])
    if return_lse:
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, q_head, pl.ds(row0, block_q)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _memory_wg():
    plgpu.set_max_registers(40, action="decrease")
    lr_l = layer if lr_layered else 0

    def load(step, slot, wait_used):
      kv = (layer, batch, pl.ds(step * block_k, block_k), kv_head)
      if wait_used:
        plgpu.barrier_wait(k_used.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[kv], k_smem.at[slot], k_bar.at[slot])
      if wait_used:
        plgpu.barrier_wait(v_used.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[kv], v_smem.at[slot], v_bar.at[slot])
      if has_lora:
        keys = pl.ds(step * block_k, block_k)
        lr_src = lr_ref.at[lr_l, batch, keys] if lr_cols == rp else lr_ref.at[lr_l, batch, :, keys]
        plgpu.copy_gmem_to_smem(lr_src, lr_smem.at[slot], v_bar.at[slot])

    for i in range(stages):
      pl.when(i < max_steps)(functools.partial(load, i, i, wait_used=False))
    if has_lora:   # B_h for the epilogue
      b_head = q_head if per_q_b else kv_head
      plgpu.copy_gmem_to_smem(b_ref.at[batch, b_head], b_smem, b_bar.at[0])

    @pl.loop(0, max_steps - stages)
    def _(step):
      load(step + stages, lax.rem(step, jnp.array(stages, step.dtype)), wait_used=True)

    # Observe the last releases too, so no barrier ends with a phase this warpgroup missed.
    @pl.loop(jnp.maximum(max_steps - stages, 0), max_steps)
    def _(step):
      slot = lax.rem(step, jnp.array(stages, step.dtype))
      plgpu.barrier_wait(k_used.at[slot])
      plgpu.barrier_wait(v_used.at[slot])


def _prefill(q, k, v, layer, kv_len, q_off, lr, lora_b, scale, *, causal, sm_scale,
             block_sizes: PrefillBlockSizes | None = None, interpret=False, return_lse=False):
  """Flash-LoRA prefill on Mosaic GPU. Canonical shapes (see _args.Canon); returns
  [B, Tq, Hq, D] (and the float32 lse [B, Tq, Hq] with return_lse).

  The caller checks ``unsupported_reason`` first. ``interpret=True`` runs Pallas' GPU
  interpret mode on the CPU (``interpret_available``): the same kernel, its barrier
  protocol checked by the interpreter, with the register operands of wgmma staged
  through shared memory (the interpreter has no register operands nor pl.run_state).
  """
  if interpret and not interpret_available():
    raise NotImplementedError(f"this JAX ({jax.__version__}) has no Pallas GPU interpret mode.")
  if plgpu is None:
    raise NotImplementedError(f"this JAX ({jax.__version__}) has no usable Pallas Mosaic GPU: {_IMPORT_ERROR}")
  b, tq, hq, d = q.shape
  num_layers, _, s_len, hkv, _ = k.shape
  group = hq // hkv
  has_lora = lr is not None
  dtype = jnp.dtype(q.dtype)
  r = lr.shape[-1] if has_lora else 0
  cfg = (block_sizes or PrefillBlockSizes()).resolve(s_len=s_len, d=d, r=r, itemsize=dtype.itemsize)
  lr_cols = lr_width(r, cfg.lr_pad) if has_lora else 0   # N of the P @ LR wgmma
  rp = lora_rows(lr_cols) if has_lora else 0             # racc columns = B rows
  block_q, block_k = cfg.block_q, cfg.block_k
  if s_len % block_k:
    raise ValueError(f"kv_len {s_len} must be a multiple of block_k {block_k} for the mosaic_gpu prefill.")
  stages = min(cfg.num_stages, s_len // block_k)   # a one-block cache: one buffer
  tile_rows = COMPUTE_WGS * block_q
  nq = pl.cdiv(tq, tile_rows)
  tq_pad = nq * tile_rows
  q_in = q if tq_pad == tq else jnp.pad(q, ((0, 0), (0, tq_pad - tq), (0, 0), (0, 0)))

  args = [layer.reshape(1).astype(jnp.int32), kv_len.astype(jnp.int32), q_off.astype(jnp.int32),
          q_in, k, v]
  lr_layered = True
  per_q_b = False
  if has_lora:
    if lr_cols != r or jnp.dtype(lr.dtype) != dtype or lr_cols != rp:
      # Only this layer's LR is padded / cast (B x S x Rp, small next to K and V);
      # an 8-column tile is read K-major: [1, B, 8, S].
      lr = lax.dynamic_index_in_dim(lr, layer, axis=0, keepdims=True)
      lr = jnp.pad(lr, ((0, 0), (0, 0), (0, 0), (0, lr_cols - r))).astype(dtype)
      if lr_cols != rp:
        lr = jnp.swapaxes(lr, 2, 3)
      lr_layered = False
    bm = jnp.pad(lora_b, ((0, 0), (0, 0), (0, rp - r), (0, 0))).astype(dtype)
    per_q_b = lora_b.shape[1] != hkv
    args += [lr, bm, scale.astype(jnp.float32)]

  kernel = functools.partial(
      _kernel, has_lora=has_lora, return_lse=return_lse, causal=causal,
      qk_scale=float(sm_scale) * LOG2E, block_q=block_q, block_k=block_k, stages=stages,
      d=d, rp=rp, lr_cols=lr_cols, group=group, per_q_b=per_q_b, lr_layered=lr_layered, nq=nq,
      dtype=dtype, staged=bool(interpret))

  swizzle = 128
  # LR tile: swizzle = its row in bytes (Rp 16 / 32 / 64 -> 32 / 64 / 128 bytes in 16-bit types).
  tiled = lambda minor: (plgpu.TilingTransform((8, minor)), plgpu.SwizzleTransform(minor * dtype.itemsize))
  big = (plgpu.TilingTransform((8, swizzle // dtype.itemsize)), plgpu.SwizzleTransform(swizzle))

  def entry(*refs):
    smem = [
        plgpu.SMEM((COMPUTE_WGS, block_q, d), dtype, transforms=big),
        plgpu.SMEM((stages, block_k, d), dtype, transforms=big),
        plgpu.SMEM((stages, block_k, d), dtype, transforms=big),
        (plgpu.SMEM((stages, block_k, rp), dtype, transforms=tiled(rp)) if lr_cols == rp else
         plgpu.SMEM((stages, lr_cols, block_k), dtype, transforms=big)) if has_lora else None,
        # B as the epilogue wgmma's [K = Rp, N = D] operand: wgmma takes K in groups of
        # swizzle / itemsize, so B gets the LR tile's swizzle (K = 16 needs 32 bytes).
        plgpu.SMEM((rp, d), dtype, transforms=tiled(rp)) if has_lora else None,
        plgpu.SMEM((COMPUTE_WGS, block_q), jnp.float32) if return_lse else None,
        # interpret mode only: the wgmma A operands (P, and the epilogue's LoRA rows).
        (plgpu.SMEM((COMPUTE_WGS, block_q, block_k), dtype, transforms=big),
         plgpu.SMEM((COMPUTE_WGS, block_q, rp), dtype, transforms=tiled(rp)) if has_lora else None)
        if interpret else None,
    ]
    # With LoRA the V and LR copies of a slot land on one barrier (two arrivals): one wait
    # per key block in the compute warpgroups instead of two.
    bars = (plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2 if has_lora else 1, num_barriers=stages),
            plgpu.Barrier(num_barriers=COMPUTE_WGS),
            plgpu.Barrier(num_barriers=1) if has_lora else None)
    used = (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2
    pl.run_scoped(lambda *scoped: kernel(*refs, scoped), smem, bars, used,
                  plgpu.Barrier(num_arrivals=COMPUTE_WGS), collective_axes="wg")

  out_type = [jax.ShapeDtypeStruct(q_in.shape, dtype), None]
  if return_lse:
    out_type[1] = jax.ShapeDtypeStruct((b, hq, tq_pad), jnp.float32)
  out, lse = plgpu.kernel(
      entry,
      out_type=out_type,
      grid=(hq, nq, b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
  )(*args)
  out = out[:, :tq] if tq_pad != tq else out
  if not return_lse:
    return out
  return out, jnp.swapaxes(lse, 1, 2)[:, :tq]


# Jitted, so that a program lowers the kernel once per shape: JAX (0.11.2) stamps every Mosaic GPU
# lowering with a fresh module name, so each lowering hashes differently and is compiled (LLVM +
# ptxas) anew at run time; 32 layers unrolled were 32 compiles per program (the paper's trace at
# 8B: 192 s of warm-up against Triton's 8 s).
prefill = jax.jit(_prefill, static_argnames=("causal", "sm_scale", "block_sizes", "interpret", "return_lse"))
