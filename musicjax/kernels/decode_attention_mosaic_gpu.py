"""The split-K decode kernel for Hopper-class GPUs through Mosaic GPU, the
Pallas GPU lowering of current jax (the Triton lowering is deprecated from
jax 0.11 on). Same contract and partials as `decode_attention`'s other
wrappers; `decode_attention.decode_attention(backend='mosaic_gpu')` calls it.

One CUDA block per (batch, kv head, split), one warpgroup each. The block
copies its query group to shared memory once, then `emit_pipeline` streams
its split's K/V blocks through shared memory (TMA, `max_concurrent_steps`
buffers in flight) and runs two WGMMAs per block: scores = q @ k^T and
acc += p @ v, with the online softmax in registers between them. The pipeline
runs only over the blocks below the row's length (a split wholly past it
runs none and writes an empty partial), so a short sequence in a long cache
reads only what it attends.

WGMMA wants 64 rows, so the query group (G = Hq / Hkv <= 64 rows) is padded
to 64: G-fold more tensor-core work than needed, which is free here because
decode is bound by reading the cache (at D=128, 64 rows x 128 keys is 64
FLOP per cache byte, against ~300 an H100 can do per byte of HBM).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64             # WGMMA's M: query rows per block (the group, padded)
SWIZZLE = 128         # bytes; K/V/q tiles in shared memory, as WGMMA reads them
DTYPES = (jnp.bfloat16,)
# Masked scores: finite, as in the other wrappers (no NaN from -inf - -inf).
_NEG = -1e30


def partials(q4, k, v, lengths, keep, *, block_k: int, num_splits: int,
             stages: int, sm_scale: float, interpret=None):
  """Unnormalised per-split (o [B,Hkv,n,64,D], m and l [B,Hkv,n,64,1]).

  q4 [B,Hkv,64,D]; k, v [B,Hkv,S,D]; lengths [B] int32; keep [B,S] float32
  (1 where the slot is valid and below the length)."""
  b, hkv, rows, d = q4.shape
  n = num_splits
  split_len = k.shape[2] // n
  nb = split_len // block_k
  tile = (plgpu.TilingTransform((8, SWIZZLE // q4.dtype.itemsize)),
          plgpu.SwizzleTransform(SWIZZLE))

  def body(len_gmem, q_gmem, k_gmem, v_gmem, keep_gmem, o_gmem, m_gmem, l_gmem,
           q_smem, o_smem, ml_smem, q_barrier):
    i, h, s = lax.axis_index('b'), lax.axis_index('h'), lax.axis_index('s')
    plgpu.copy_gmem_to_smem(q_gmem.at[i, h], q_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)

    def step(_, k_smem, v_smem, keep_smem, carry):
      acc, m, l = carry

      def scores(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.T)
        return acc_ref[...]
      sc = pl.run_scoped(scores, plgpu.ACC((rows, block_k), jnp.float32))
      kept = plgpu.load(keep_smem, layout=plgpu.Layout.WGMMA.reduce(0))
      ok = lax.broadcast_in_dim(kept, sc.shape, [1]) > 0
      sc = jnp.where(ok, sc * sm_scale, _NEG)
      m_new = jnp.maximum(m, sc.max(axis=1))
      p = jnp.where(ok, jnp.exp(sc - lax.broadcast_in_dim(m_new, sc.shape, [0])),
                    0.0)
      alpha = jnp.exp(m - m_new)
      l = alpha * l + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      acc = pl.run_state(
          lambda ref: plgpu.wgmma(ref, p.astype(v_smem.dtype), v_smem))(
              plgpu.ACC.init(acc))
      return acc, m_new, l

    # Blocks of this split below the length (0 past it): the pipeline's trip
    # count, so nothing past the length is copied or computed.
    rest = jnp.maximum(len_gmem[i] - s * split_len, 0)
    nblocks = jnp.minimum(lax.div(rest + block_k - 1, block_k), nb)
    kv = plgpu.BlockSpec((block_k, d), lambda j: (s * nb + j, 0), transforms=tile)
    init = (plgpu.layout_cast(jnp.zeros((rows, d), jnp.float32),
                              plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((rows,), _NEG, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1)),
            plgpu.layout_cast(jnp.zeros((rows,), jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1)))
    acc, m, l = plgpu.emit_pipeline(
        step, grid=(nblocks,), max_concurrent_steps=min(stages, nb),
        in_specs=[kv, kv, plgpu.BlockSpec((block_k,), lambda j: (s * nb + j,))],
        init_carry=init)(k_gmem.at[i, h], v_gmem.at[i, h], keep_gmem.at[i])
    o_smem[...] = acc
    ml_smem[0] = m
    ml_smem[1] = l
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[i, h, s])
    plgpu.copy_smem_to_gmem(ml_smem.at[0], m_gmem.at[i, h, s])
    plgpu.copy_smem_to_gmem(ml_smem.at[1], l_gmem.at[i, h, s])
    plgpu.wait_smem_to_gmem(0)

  o, m, l = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((b, hkv, n, rows, d), jnp.float32),
                jax.ShapeDtypeStruct((b, hkv, n, rows), jnp.float32),
                jax.ShapeDtypeStruct((b, hkv, n, rows), jnp.float32)),
      scratch_types=(plgpu.SMEM((rows, d), q4.dtype, transforms=tile),
                     plgpu.SMEM((rows, d), jnp.float32),
                     plgpu.SMEM((2, rows), jnp.float32),
                     plgpu.Barrier(num_barriers=1)),
      grid=(b, hkv, n), grid_names=('b', 'h', 's'),
      interpret=interpret,
      kernel_name='musicjax_decode_attention',
  )(lengths, q4, k, v, keep)
  return o, m[..., None], l[..., None]


def interpret_params():
  """Pallas's GPU interpreter (runs this kernel on the CPU, for tests)."""
  return plgpu.InterpretGPUParams()
