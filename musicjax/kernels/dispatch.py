"""Which decode attention runs: the Pallas kernel on GPU and TPU, XLA on CPU.

`sample.attention` in an LM config (and `gen.Sampling.attention`):
  * 'auto': the kernel where it compiles natively (GPU via Triton, TPU via
    Mosaic) and the shapes suit it; XLA otherwise (CPU, or a head dim Triton
    cannot tile);
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
_NATIVE = {'gpu': 'triton', 'cuda': 'triton', 'tpu': 'tpu'}  # platform -> wrapper


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
  return None


# What `resolve` returns: the XLA path, a native kernel, or the kernel run in
# Pallas's interpreter (Triton-style wrapper; any platform).
RESOLVED = ('xla', 'triton', 'tpu', 'interpret')


def resolve(impl: str, num_heads: int, num_kv_heads: int, head_dim: int,
            params: kernel.KernelParams, platform: str | None = None) -> str:
  """One of RESOLVED for this platform (default: jax's default backend).

  Static on purpose: `lax.platform_dependent` would trace the kernel for
  every platform, so parameters valid on GPU but not on TPU (block_k=64)
  would fail everywhere."""
  check_impl(impl)
  if impl == 'xla':
    return 'xla'
  platform = platform or jax.default_backend()
  native = _NATIVE.get(platform)
  why = unsupported(num_heads, num_kv_heads, head_dim, params,
                    native or 'triton')
  if impl == 'pallas':
    if why:
      raise ValueError(f'sample.attention=pallas: {why}; use '
                       "sample.attention='xla' or change the kernel parameters")
    return native or 'interpret'
  return native if native and why is None else 'xla'


def _pallas(q, k, v, lengths, valid, impl: str, params: kernel.KernelParams):
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
