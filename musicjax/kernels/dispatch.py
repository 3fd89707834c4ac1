"""Which decode attention runs: the Pallas kernel on GPU and TPU, XLA on CPU.

`sample.attention` in an LM config (and `gen.Sampling.attention`):
  * 'auto': the kernel where it compiles natively and the shapes suit it:
    on TPU the Mosaic wrapper; on a Hopper-or-newer GPU with jax >= 0.11 the
    Mosaic GPU wrapper (bfloat16 caches); on other GPUs, or for a float32
    cache, the Triton wrapper while the installed jax still ships it; XLA
    otherwise (CPU, or shapes no wrapper tiles);
  * 'xla': the XLA path everywhere;
  * 'pallas': the kernel everywhere; where Pallas has no native backend (CPU)
    it runs in Pallas's interpreter (slow; for tests and debugging).
The choice is static (made when the decode loop is traced), so a compiled
loop contains one attention implementation.

Under a multi-device mesh the kernel runs per shard with `shard_map`: batch
over the mesh axes the rules give 'batch', heads over those given both
'heads' and 'kv_heads' (a query group then stays with its KV head). XLA
cannot partition a custom call, so without this it would gather the cache.
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from musicjax.kernels import decode_attention as kernel
from musicjax.kernels import decode_reference
from musicjax.parallel import rules

IMPLS = ('auto', 'xla', 'pallas')
_GPU = ('gpu', 'cuda')
MOSAIC_GPU_MIN_ARCH = 9.0   # WGMMA and TMA: Hopper


def gpu_arch() -> float | None:
  """Compute capability of the first local GPU (9.0 on an H100), or None."""
  try:
    return float(jax.devices('gpu')[0].compute_capability)
  except (RuntimeError, AttributeError, ValueError, IndexError):
    return None


def native_backends(platform: str, arch: float | None = None) -> tuple[str, ...]:
  """The kernel wrappers that compile natively on `platform`, best first
  (`arch`: the GPU's compute capability; default the local GPU's)."""
  if platform == 'tpu':
    return ('tpu',)
  if platform not in _GPU:
    return ()
  arch = gpu_arch() if arch is None else arch
  hopper = arch is not None and arch >= MOSAIC_GPU_MIN_ARCH
  order = ('mosaic_gpu', 'triton') if hopper else ('triton',)
  return tuple(b for b in order if b in kernel.AVAILABLE)


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"decode attention must be one of {IMPLS} ('auto' picks "
                     f'the kernel on GPU/TPU), got {impl!r}')


def unsupported(num_heads: int, num_kv_heads: int, head_dim: int,
                params: kernel.KernelParams, backend: str) -> str | None:
  """Why the kernel cannot run these shapes on `backend` (None: it can)."""
  try:
    kernel.check_params(params, backend)
  except ValueError as e:
    return str(e)
  if num_heads % num_kv_heads:
    return f'{num_heads} query heads are not a multiple of {num_kv_heads} KV heads'
  if backend == 'triton' and (head_dim < 16 or head_dim & (head_dim - 1)):
    return f'head dim {head_dim} is not a power of 2 >= 16 (Triton tiles)'
  if backend == 'mosaic_gpu' and (head_dim % 64 or num_heads // num_kv_heads > 64):
    return (f'head dim {head_dim} is not a multiple of 64, or the query group '
            f'{num_heads // num_kv_heads} exceeds 64 rows (Mosaic GPU tiles)')
  return None


# What `resolve` returns: the XLA path, a native kernel, or the kernel run in
# Pallas's interpreter (Triton-style wrapper; any platform).
RESOLVED = ('xla', 'triton', 'tpu', 'mosaic_gpu', 'interpret')


def resolve(impl: str, num_heads: int, num_kv_heads: int, head_dim: int,
            params: kernel.KernelParams, platform: str | None = None,
            arch: float | None = None) -> str:
  """One of RESOLVED for this platform (default: jax's default backend).

  Static on purpose: `lax.platform_dependent` would trace the kernel for
  every platform, so parameters valid on GPU but not on TPU (block_k=64)
  would fail everywhere."""
  check_impl(impl)
  if impl == 'xla':
    return 'xla'
  platform = platform or jax.default_backend()
  natives = native_backends(platform, arch)
  whys = {b: unsupported(num_heads, num_kv_heads, head_dim, params, b)
          for b in natives or ('triton',)}
  fits = [b for b in natives if whys[b] is None]
  if impl == 'pallas':
    if natives and not fits:
      raise ValueError(f'sample.attention=pallas: {whys[natives[0]]}; use '
                       "sample.attention='xla' or change the kernel parameters")
    if not natives and whys['triton']:
      raise ValueError(f"sample.attention=pallas: {whys['triton']}; use "
                       "sample.attention='xla' or change the kernel parameters")
    return fits[0] if fits else 'interpret'
  return fits[0] if fits else 'xla'


def _pallas(q, k, v, lengths, valid, impl: str, params: kernel.KernelParams):
  if impl == 'mosaic_gpu' and q.dtype not in kernel.mosaic_gpu.DTYPES:
    # The cache dtype is only known here: a float32 cache takes the Triton
    # wrapper where jax has it, else XLA.
    if 'triton' not in kernel.AVAILABLE:
      return decode_reference.decode_attention_reference(q, k, v, lengths, valid)
    impl = 'triton'
  if impl == 'interpret':
    return kernel.decode_attention(q, k, v, lengths, valid, backend='triton',
                                   params=params, interpret=True)
  return kernel.decode_attention(q, k, v, lengths, valid, backend=impl,
                                 params=params)


def _mesh_specs(q, k):
  """(q, kv, per-row) PartitionSpecs for shard_map, or None off-mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  table = rules.current_rules()
  if table is None or mesh.empty or mesh.size == 1:
    return None
  qs = rules.logical_to_spec(('batch', 'heads', None), q.shape, mesh, table)
  ks = rules.logical_to_spec(('batch', 'kv_heads', None, None), k.shape, mesh,
                             table)
  batch = qs[0] if qs[0] == ks[0] else None
  heads = qs[1] if qs[1] == ks[1] else None
  return P(batch, heads, None), P(batch, heads, None, None), P(batch)


def attend_decode(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                  valid: jax.Array | None, *, impl: str,
                  params: kernel.KernelParams = kernel.KernelParams()
                  ) -> jax.Array:
  """q [B,Hq,D] against k, v [B,Hkv,S,D]; `impl` as returned by `resolve`."""
  if impl == 'xla':
    return decode_reference.decode_attention_reference(q, k, v, lengths, valid)
  if impl not in RESOLVED:
    raise ValueError(f'impl must be one of {RESOLVED} (see resolve), got {impl!r}')
  specs = _mesh_specs(q, k)
  run = functools.partial(_pallas, impl=impl, params=params)
  if specs is None:
    return run(q, k, v, lengths, valid)
  qs, ks, rows = specs
  valid_spec = P(rows[0], None)
  if valid is None:
    return jax.shard_map(lambda a, b, c, d: run(a, b, c, d, None),
                         in_specs=(qs, ks, ks, rows), out_specs=qs,
                         check_vma=False)(q, k, v, lengths)
  return jax.shard_map(run, in_specs=(qs, ks, ks, rows, valid_spec),
                       out_specs=qs, check_vma=False)(q, k, v, lengths, valid)
