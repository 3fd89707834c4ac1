"""Split-K flash-decoding attention in Pallas: one query token per sequence
against a long KV cache, reading each KV byte once.

Layout (see `decode_reference` for the semantics): q [B, Hq, D], k/v
[B, Hkv, S, D] (the cache layout of `nn.transformer`, so nothing is
transposed per step), lengths [B], optional valid [B, S].

Grid (batch, kv head, split). Each program takes one [S / num_splits, D] slab
of K and V and the G = Hq / Hkv query heads of its group as the rows of one
[G_pad, D] tile (padded to the backend's minimum matmul/sublane rows), so a KV
byte is read once per group rather than once per query head. It walks its
slab in `block_k` steps with an online softmax in float32, stops after the
sequence's length, and writes an unnormalised partial (o, m, l); `_merge`
combines the splits in JAX. Splitting the KV axis puts B * Hkv * num_splits
programs in flight, which is what keeps a GPU busy at batch 1.

Three wrappers produce the same partials:
  * 'triton' (GPU, Pallas's Triton lowering: jax 0.10, deprecated from 0.11
    on but still shipped): lengths are an ordinary blocked input; the loop
    bound skips the slots past the length, and a split entirely past it runs
    zero iterations.
  * 'tpu' (Mosaic): lengths are scalar-prefetched into SMEM; the K/V/valid
    index maps clamp a split past the length to the last useful one, so the
    pipeline sees the same block index again and skips its copy.
  * 'mosaic_gpu' (Hopper and newer, jax >= 0.11; decode_attention_mosaic_gpu):
    a TMA pipeline over the blocks below the length, WGMMA for both matmuls.
'triton' and 'tpu' share one body (`_body`, plain jnp/lax on refs).
`AVAILABLE` lists the wrappers the installed jax offers.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

try:  # Deprecated from jax 0.11 on; gone in some later jax.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover (not in the tested jax versions)
  pltriton = None
try:  # jax >= 0.11: plgpu.kernel with out_type and the GPU interpreter.
  from musicjax.kernels import decode_attention_mosaic_gpu as mosaic_gpu
except (ImportError, AttributeError, TypeError):
  mosaic_gpu = None
if mosaic_gpu is not None and jax.__version_info__ < (0, 11):
  mosaic_gpu = None   # imports on 0.10, but its plgpu.kernel API differs

BACKENDS = ('triton', 'tpu', 'mosaic_gpu')
AVAILABLE = tuple(b for b, ok in (('triton', pltriton is not None), ('tpu', True),
                                  ('mosaic_gpu', mosaic_gpu is not None)) if ok)
# Query rows per program: Triton's tl.dot needs M >= 16; TPU tiles are 8
# sublanes (16 for packed bfloat16); WGMMA takes 64 rows.
_GROUP_ROWS = {('triton', 4): 16, ('triton', 2): 16, ('tpu', 4): 8, ('tpu', 2): 16,
               ('mosaic_gpu', 2): 64}
# Masked scores: finite, so exp(m_old - m_new) stays defined while every key
# seen so far is masked (-inf - -inf would be NaN).
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class KernelParams:
  """Tuning knobs. Defaults: 128-key blocks (one MXU/tensor-core tile wide) and
  8 splits (B=1, 8 KV heads gives 64 programs: about half an H100's SMs;
  raise it for fewer KV heads, lower it for large batches)."""
  block_k: int = 128     # keys per inner step; power of 2, >= 16 (GPU), multiple of 128 (TPU)
  num_splits: int = 8    # KV splits per (batch, kv head); power of 2
  num_warps: int = 4     # GPU (Triton) only
  num_stages: int = 2    # GPU only: blocks in flight (Triton's software
                         # pipelining depth; Mosaic GPU's TMA buffers)

  @property
  def granule(self) -> int:
    """The cache length must be a multiple of this (`cache_length` rounds)."""
    return self.block_k * self.num_splits


def cache_length(slots: int, params: KernelParams) -> int:
  """Slots rounded up to what the kernel accepts (extra slots stay invalid)."""
  g = params.granule
  return -(-slots // g) * g


def _pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def check_params(params: KernelParams, backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f'decode attention backend must be one of {BACKENDS}, got '
                     f'{backend!r}')
  if backend not in AVAILABLE:
    raise ValueError(f'decode attention backend {backend!r} is not in the '
                     f'installed jax {jax.__version__} (it has {AVAILABLE}); '
                     "'mosaic_gpu' needs jax >= 0.11")
  bk, ns = params.block_k, params.num_splits
  if not _pow2(bk) or bk < 16:
    raise ValueError(f'block_k={bk} must be a power of 2 and >= 16 (Triton '
                     'loads power-of-2 tiles and tl.dot needs 16 rows)')
  if backend == 'mosaic_gpu' and bk < 64:
    raise ValueError(f'block_k={bk} must be >= 64 for Mosaic GPU (the WGMMA '
                     'tile)')
  if backend == 'tpu' and bk % 128:
    raise ValueError(f'block_k={bk} must be a multiple of 128 on TPU (the lane '
                     'width of a vector register)')
  if not _pow2(ns):
    raise ValueError(f'num_splits={ns} must be a power of 2 (1, 2, 4, ...)')
  if params.num_warps < 1 or params.num_stages < 1:
    raise ValueError(f'num_warps={params.num_warps} and num_stages='
                     f'{params.num_stages} must be >= 1')


def check_inputs(q, k, v, lengths, valid, params: KernelParams,
                 backend: str) -> None:
  """Shape, dtype and divisibility checks, each naming the fix."""
  check_params(params, backend)
  if q.ndim != 3 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f'want q [B,Hq,D] and k, v [B,Hkv,S,D] of one shape; got '
                     f'q {q.shape}, k {k.shape}, v {v.shape}')
  b, hq, d = q.shape
  kb, hkv, s, kd = k.shape
  if kb != b or kd != d:
    raise ValueError(f'q {q.shape} and k {k.shape} disagree on batch or head dim')
  if hq % hkv:
    raise ValueError(f'query heads {hq} must be a multiple of KV heads {hkv}')
  if lengths.shape != (b,):
    raise ValueError(f'lengths must be [B]=[{b}], got {lengths.shape}')
  if valid is not None and valid.shape != (b, s):
    raise ValueError(f'valid must be [B,S]=[{b},{s}], got {valid.shape}')
  for name, x in (('q', q), ('k', k), ('v', v)):
    if x.dtype not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f'{name} must be float32 or bfloat16, got {x.dtype}')
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f'q, k, v must share a dtype; got {q.dtype}, {k.dtype}, '
                     f'{v.dtype}')
  if backend == 'mosaic_gpu':
    if q.dtype not in mosaic_gpu.DTYPES:
      raise ValueError(f'the Mosaic GPU kernel takes a bfloat16 cache, got '
                       f'{q.dtype}; cast the cache, or use the Triton or XLA '
                       'path for float32')
    if d % 64 or hq // hkv > mosaic_gpu.ROWS:
      raise ValueError(f'head dim {d} must be a multiple of 64 and the query '
                       f'group {hq // hkv} at most {mosaic_gpu.ROWS} for Mosaic '
                       'GPU (128-byte swizzled tiles, 64-row WGMMA)')
  if backend == 'triton' and (not _pow2(d) or d < 16):
    raise ValueError(f'head dim {d} must be a power of 2 >= 16 for the Triton '
                     'lowering (it loads power-of-2 tiles)')
  if s % params.granule:
    raise ValueError(
        f'cache length {s} is not a multiple of block_k * num_splits = '
        f'{params.block_k} * {params.num_splits}; allocate the cache with '
        f'kernels.decode_attention.cache_length({s}, params) = '
        f'{cache_length(s, params)} slots')


def _body(length, split, q_ref, k_ref, v_ref, valid_ref, o_ref, m_ref, l_ref,
          *, block_k: int, split_len: int, sm_scale: float):
  """One (batch, kv head, split) program; refs hold this program's blocks:
  q [Gp, D], k/v [split_len, D], valid [1, split_len], o [Gp, D], m/l [Gp, 1]."""
  start = split * split_len
  # Blocks of this split that hold slots below the length (0 past it).
  # lax.div on non-negative ints: `//` lowers through sign(), which Mosaic
  # only lowers when it can query a real TPU.
  rest = jnp.maximum(length - start, 0)
  nblocks = jnp.minimum(lax.div(rest + block_k - 1, block_k),
                        split_len // block_k)
  q = q_ref[...]
  gp, d = q.shape

  def step(i, carry):
    m, l, acc = carry
    off = pl.multiple_of(i * block_k, block_k)
    kb = k_ref[pl.ds(off, block_k), :]
    vb = v_ref[pl.ds(off, block_k), :]
    s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32) * sm_scale
    pos = start + off + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    ok = (pos < length) & (valid_ref[:, pl.ds(off, block_k)] != 0)
    s = jnp.where(ok, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return m_new, l, alpha * acc + pv

  init = (jnp.full((gp, 1), _NEG, jnp.float32), jnp.zeros((gp, 1), jnp.float32),
          jnp.zeros((gp, d), jnp.float32))
  m, l, acc = lax.fori_loop(0, nblocks, step, init)
  o_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _out_shapes(b, hkv, n, gp, d):
  return (jax.ShapeDtypeStruct((b, hkv, n, gp, d), jnp.float32),
          jax.ShapeDtypeStruct((b, hkv, n, gp, 1), jnp.float32),
          jax.ShapeDtypeStruct((b, hkv, n, gp, 1), jnp.float32))


def _kernel(read_length, params: KernelParams, split_len: int, sm_scale: float):
  """The pallas_call body: `read_length(len_ref)` is the wrapper's way to get
  this row's length."""
  body = functools.partial(_body, block_k=params.block_k, split_len=split_len,
                           sm_scale=sm_scale)

  def kernel(len_ref, q_ref, k_ref, v_ref, valid_ref, o_ref, m_ref, l_ref):
    body(read_length(len_ref), pl.program_id(2), q_ref, k_ref, v_ref,
         valid_ref, o_ref, m_ref, l_ref)
  return kernel


def _triton_call(q4, k, v, lengths, valid3, params, sm_scale, interpret):
  b, hkv, gp, d = q4.shape
  n = params.num_splits
  split_len = k.shape[2] // n
  # Lengths arrive as a blocked input: this row's one entry.
  kernel = _kernel(lambda ref: ref[0], params, split_len, sm_scale)

  kv_spec = pl.BlockSpec((None, None, split_len, d), lambda i, h, s: (i, h, s, 0))
  part = lambda w: pl.BlockSpec((None, None, None, gp, w),
                                lambda i, h, s: (i, h, s, 0, 0))
  return pl.pallas_call(
      kernel,
      grid=(b, hkv, n),
      in_specs=[pl.BlockSpec((1,), lambda i, h, s: (i,)),
                pl.BlockSpec((None, None, gp, d), lambda i, h, s: (i, h, 0, 0)),
                kv_spec, kv_spec,
                pl.BlockSpec((None, 1, split_len), lambda i, h, s: (i, 0, s))],
      out_specs=[part(d), part(1), part(1)],
      out_shape=_out_shapes(b, hkv, n, gp, d),
      compiler_params=pltriton.CompilerParams(num_warps=params.num_warps,
                                              num_stages=params.num_stages),
      interpret=interpret,
      name='musicjax_decode_attention',
  )(lengths, q4, k, v, valid3)


def _tpu_call(q4, k, v, lengths, valid3, params, sm_scale, interpret):
  b, hkv, gp, d = q4.shape
  n = params.num_splits
  split_len = k.shape[2] // n
  # Lengths are scalar-prefetched into SMEM: all rows, indexed by the row.
  kernel = _kernel(lambda ref: ref[pl.program_id(0)], params, split_len,
                   sm_scale)

  def useful(i, s, lens):
    # Splits past the length reuse the last useful block index: no new DMA.
    last = jnp.maximum(lax.div(lens[i] + split_len - 1, split_len) - 1, 0)
    return jnp.minimum(s, last)

  kv_spec = pl.BlockSpec((None, None, split_len, d),
                         lambda i, h, s, lens: (i, h, useful(i, s, lens), 0))
  part = lambda w: pl.BlockSpec((None, None, None, gp, w),
                                lambda i, h, s, lens: (i, h, s, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, hkv, n),
      in_specs=[pl.BlockSpec((None, None, gp, d),
                             lambda i, h, s, lens: (i, h, 0, 0)),
                kv_spec, kv_spec,
                pl.BlockSpec((None, 1, split_len),
                             lambda i, h, s, lens: (i, 0, useful(i, s, lens)))],
      out_specs=[part(d), part(1), part(1)])
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=_out_shapes(b, hkv, n, gp, d),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='musicjax_decode_attention',
  )(lengths, q4, k, v, valid3)


def _merge(o, m, l, g: int, dtype) -> jax.Array:
  """Combine per-split partials [B,Hkv,n,Gp,*] into [B, Hkv*G, D]."""
  m_max = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp(m - m_max)
  l_tot = jnp.sum(w * l, axis=2)
  o_tot = jnp.sum(w * o, axis=2)
  out = jnp.where(l_tot > 0, o_tot / jnp.where(l_tot > 0, l_tot, 1.0), 0.0)
  b, hkv, _, d = out.shape
  return out[:, :, :g].reshape(b, hkv * g, d).astype(dtype)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     lengths: jax.Array, valid: jax.Array | None = None, *,
                     backend: str = 'triton',
                     params: KernelParams = KernelParams(),
                     sm_scale: float | None = None,
                     interpret=False) -> jax.Array:
  """The Pallas kernel; same contract as `decode_attention_reference`.

  `interpret`: False on the target hardware; True (or TPU `InterpretParams`)
  runs the kernel in Pallas's interpreter on any backend, CPU included.
  """
  check_inputs(q, k, v, lengths, valid, params, backend)
  b, hq, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  g = hq // hkv
  gp = max(_GROUP_ROWS[(backend, q.dtype.itemsize)], g)
  gp = 1 << (gp - 1).bit_length()   # power of 2 (Triton tiles)
  q4 = q.reshape(b, hkv, g, d)
  if gp > g:
    q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)
  if valid is None:
    valid3 = jnp.ones((b, 1, s), jnp.int32)
  else:
    valid3 = valid.astype(jnp.int32).reshape(b, 1, s)
  scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  if backend == 'mosaic_gpu':
    # The last block may run past the length: its slots are masked here.
    keep = ((valid3[:, 0] != 0) & (jnp.arange(s)[None] < lengths[:, None])
            ).astype(jnp.float32)
    o, m, l = mosaic_gpu.partials(
        q4, k, v, lengths, keep, block_k=params.block_k,
        num_splits=params.num_splits, stages=params.num_stages, sm_scale=scale,
        interpret=mosaic_gpu.interpret_params() if interpret else None)
    return _merge(o, m, l, g, q.dtype)
  call = _triton_call if backend == 'triton' else _tpu_call
  o, m, l = call(q4, k, v, lengths, valid3, params, scale, interpret)
  return _merge(o, m, l, g, q.dtype)
