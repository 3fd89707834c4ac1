"""Decode kernels that jax and its ecosystem already ship, as baselines for
`musicjax bench decode-attention`, each adapted to our contract: q [B,Hq,D]
against a [B,Hkv,S,D] cache with lengths [B]; none takes `valid` holes.

  * 'jax_gqa': `jax.experimental.pallas.ops.gpu.decode_attention.gqa`, a
    split-K GQA decode kernel on the Triton lowering. Shipped up to jax 0.10;
    jax 0.11 deprecated the Triton ops and 0.12 no longer ships them.
  * 'jax_paged': `jax.experimental.pallas.ops.tpu.paged_attention`, the TPU
    decode kernel over a paged cache (our cache, cut into pages in order).
  * 'tokamax': `tokamax.dot_product_attention` (PyPI; jax >= 0.11.1, Python
    >= 3.12) with its Pallas-Triton flash kernel. Its Mosaic GPU and Mosaic
    TPU kernels do not decode: 0.0.17 wants the query length to be a multiple
    of their 128-row block and rejects key lengths ('mask.k_end').

Each baseline has a native platform, where it is timed, and a CPU form used
by the tests to check it against the reference: Pallas's interpreters for
the jax kernels, tokamax's own XLA implementation for tokamax (its Pallas
kernels refuse to trace without a GPU). `prepare` converts the cache to the
baseline's layout once, outside the timing; `call` is what gets timed.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

PAGE_SIZE = 128             # slots per page for jax_paged
PAGES_PER_BLOCK = 4         # pages per compute block (its tuning knob)


@dataclasses.dataclass(frozen=True)
class Baseline:
  name: str
  what: str
  native: str                              # platform it compiles for
  missing: Callable[[], str | None]        # why it is absent here, or None
  prepare: Callable                        # (k, v) -> cache in its layout
  call: Callable                           # (q, cache, lengths, native) -> out
  cpu_form: str                            # what runs on CPU


def _gqa_missing() -> str | None:
  try:
    from jax.experimental.pallas.ops.gpu import decode_attention  # noqa: F401
  except ImportError:
    return (f'jax {jax.__version__} no longer ships the Triton ops '
            '(jax.experimental.pallas.ops.gpu.decode_attention, up to 0.10)')
  return None


def _gqa_call(q, cache, lengths, native: bool):
  from jax.experimental.pallas.ops.gpu import decode_attention as ops
  k, v = cache
  return ops.gqa(q, k, v, kv_seq_len=lengths, interpret=not native)


def _to_seq_major(k, v):
  """[B,Hkv,S,D] -> [B,S,Hkv,D], the layout of jax_gqa and tokamax."""
  return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)


def _paged_missing() -> str | None:
  try:
    from jax.experimental.pallas.ops.tpu import paged_attention  # noqa: F401
  except ImportError:
    return f'jax {jax.__version__} has no pallas.ops.tpu.paged_attention'
  return None


def _to_pages(k, v):
  """[B,Hkv,S,D] -> pages [Hkv, B*S/PAGE_SIZE, PAGE_SIZE, D] (row-major)."""
  b, hkv, s, d = k.shape
  if s % (PAGE_SIZE * PAGES_PER_BLOCK):
    raise ValueError(f'jax_paged wants the cache length to be a multiple of '
                     f'{PAGE_SIZE * PAGES_PER_BLOCK}, got {s}')
  page = lambda x: jnp.swapaxes(x, 0, 1).reshape(hkv, b * s // PAGE_SIZE,
                                                 PAGE_SIZE, d)
  return page(k), page(v)


def _paged_call(q, cache, lengths, native: bool):
  from jax.experimental.pallas import tpu as pltpu
  from jax.experimental.pallas.ops.tpu import paged_attention as ops
  k_pages, v_pages = cache
  b, per_seq = q.shape[0], k_pages.shape[1] // q.shape[0]
  pages = jnp.arange(b * per_seq, dtype=jnp.int32).reshape(b, per_seq)
  # The kernel takes q already scaled by 1/sqrt(D).
  scaled = (q * q.shape[-1] ** -0.5).astype(q.dtype)
  interp = (contextlib.nullcontext() if native
            else pltpu.force_tpu_interpret_mode())
  with interp:
    return ops.paged_attention(scaled, k_pages, v_pages, lengths, pages,
                               pages_per_compute_block=PAGES_PER_BLOCK)


def _tokamax_missing() -> str | None:
  try:
    import tokamax  # noqa: F401
  except ImportError:
    return ('tokamax is not installed (PyPI; Python >= 3.12 and jax >= 0.11.1: '
            "pip install 'musicjax[kernels]')")
  return None


def _tokamax_call(q, cache, lengths, native: bool):
  import tokamax
  k, v = cache
  out = tokamax.dot_product_attention(
      q[:, None], k, v, key_value_seq_lengths=lengths,
      implementation='triton' if native else 'xla')
  return out[:, 0]


BASELINES = {
    'jax_gqa': Baseline(
        'jax_gqa', "jax's Pallas split-K GQA decode kernel (Triton, jax <= 0.10)",
        'gpu', _gqa_missing, _to_seq_major, _gqa_call, "Pallas's interpreter"),
    'jax_paged': Baseline(
        'jax_paged', "jax's Pallas TPU paged-attention decode kernel",
        'tpu', _paged_missing, _to_pages, _paged_call,
        "Pallas's TPU interpreter"),
    'tokamax': Baseline(
        'tokamax', "tokamax.dot_product_attention, its Pallas-Triton kernel",
        'gpu', _tokamax_missing, _to_seq_major, _tokamax_call,
        "tokamax's XLA implementation"),
}


def available() -> dict[str, str | None]:
  """name -> None where the installed packages have it, else why not."""
  return {name: b.missing() for name, b in BASELINES.items()}


def attend(name: str, native: bool):
  """(prepare, call) with call(q, cache, lengths) for the bench and tests."""
  b = BASELINES[name]
  why = b.missing()
  if why:
    raise ValueError(f'{name}: {why}')
  return b.prepare, lambda q, cache, lengths: b.call(q, cache, lengths, native)


def cross_compile():
  """Context in which tokamax lowers its GPU kernels without a GPU here."""
  import tokamax
  return tokamax.config.cross_compile(True)
