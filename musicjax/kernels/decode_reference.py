"""Pure-JAX decode attention: the reference for the Pallas kernel, and the
path XLA runs on CPU.

One new query token per sequence attends to a KV cache:
  q [B, Hq, D], k/v [B, Hkv, S, D], lengths [B] (slots [0, length) may be
  attended), optional valid [B, S] (slots inside the length that are holes:
  left padding, null-condition pads). Hq is a multiple of Hkv; the query heads
  h = kv * G + g of a group share KV head kv (the layout of
  `nn.transformer.attend`).

A row with no attendable slot returns zeros (the kernel does the same).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def key_mask(lengths: jax.Array, valid: jax.Array | None, s: int) -> jax.Array:
  """[B, S] bool: slot < length, and valid where a valid mask is given."""
  ok = jnp.arange(s)[None, :] < lengths[:, None]
  if valid is not None:
    ok = ok & valid.astype(bool)
  return ok


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                               lengths: jax.Array, valid: jax.Array | None = None,
                               *, sm_scale: float | None = None) -> jax.Array:
  """[B, Hq, D] in q's dtype; scores, softmax and sums in float32."""
  b, hq, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  scale = d ** -0.5 if sm_scale is None else sm_scale
  qg = q.reshape(b, hkv, hq // hkv, d)
  scores = jnp.einsum('bkgd,bksd->bkgs', qg, k,
                      preferred_element_type=jnp.float32) * scale
  ok = key_mask(lengths, valid, s)[:, None, None, :]
  scores = jnp.where(ok, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.where(ok, jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum('bkgs,bksd->bkgd', p.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
  return o.reshape(b, hq, d).astype(q.dtype)
