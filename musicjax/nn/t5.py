"""A T5 encoder (the text conditioner of MusicGen), in JAX.

T5 differs from our Llama-style blocks in ways that matter for equal outputs:
its layer norm scales by the root mean square without centring or bias
(eps 1e-6), attention logits are not divided by sqrt(head_dim) (T5 folds
that into its initialisation), and positions enter only as a learned bias
on the attention logits per head, read from log-spaced buckets of the
relative distance, computed once by the first layer and shared by all.
The MLP is ReLU (T5 v1.0, MusicGen's t5-base) or gated GELU (v1.1).

Layers are stacked on a leading axis and scanned. Weights load from a
transformers T5 checkpoint with musicjax/export/released/t5.py.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from musicjax.config import ConfigError
from musicjax.parallel import rules

MLPS = ('relu', 'gated-gelu')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def default_config() -> ml_collections.ConfigDict:
  """t5-base, the text encoder of the released MusicGen models."""
  c = ml_collections.ConfigDict()
  c.vocab_size = 32128
  c.dim = 768                     # d_model
  c.num_heads = 12
  c.head_dim = 64                 # d_kv
  c.mlp_dim = 3072                # d_ff
  c.num_layers = 12
  c.mlp = 'relu'                  # relu (T5 v1.0) | gated-gelu (v1.1)
  c.relative_buckets = 32
  c.relative_max_distance = 128
  c.norm_eps = 1e-6
  c.init_std = 0.02               # random init only (weights are loaded)
  c.dtype = 'float32'             # matmul dtype
  return c


def check_config(c: ml_collections.ConfigDict, where: str = 'text_encoder'
                 ) -> None:
  if c.mlp not in MLPS:
    raise ConfigError(f'config.{where}.mlp must be one of {MLPS}, got '
                      f'{c.mlp!r}')
  if c.relative_buckets < 4 or c.relative_buckets % 2:
    raise ConfigError(f'config.{where}.relative_buckets must be even and >= 4 '
                      f'(half per direction), got {c.relative_buckets}')
  if c.relative_max_distance <= c.relative_buckets // 4:
    raise ConfigError(
        f'config.{where}.relative_max_distance={c.relative_max_distance} must '
        f'exceed relative_buckets / 4 = {c.relative_buckets // 4} (the exact '
        'buckets)')
  if c.dtype not in _DTYPES:
    raise ConfigError(f'config.{where}.dtype must be one of {tuple(_DTYPES)}, '
                      f'got {c.dtype!r}')


def relative_buckets(length_q: int, length_k: int, num_buckets: int,
                     max_distance: int) -> np.ndarray:
  """Bucket [q, k] of each key's offset from its query (bidirectional): half
  the buckets per direction; within a half, offsets below a quarter of the
  buckets are exact and longer ones log-spaced up to `max_distance`, beyond
  which they share the last bucket. Computed in float32, as T5's reference
  code does, so the buckets at log-space edges agree."""
  offset = np.arange(length_k)[None, :] - np.arange(length_q)[:, None]
  half = num_buckets // 2
  exact = half // 2
  bucket = (offset > 0).astype(np.int64) * half
  n = np.abs(offset)
  with np.errstate(divide='ignore'):
    scaled = (np.log(n.astype(np.float32) / np.float32(exact))
              / np.float32(math.log(max_distance / exact))
              * np.float32(half - exact))
  large = exact + np.where(n < exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (bucket + np.where(n < exact, n, large)).astype(np.int32)


def _param(rngs: nnx.Rngs, shape, std: float, names) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   out_sharding=names)


def _norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale).astype(x.dtype)


class T5Encoder(nnx.Module):
  """Token ids [B, T] and a mask [B, T] -> states [B, T, dim] (float32)."""

  def __init__(self, c: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    check_config(c)
    self.config = ml_collections.FrozenConfigDict(c)
    n, e, h, d, f = (int(c.num_layers), int(c.dim), int(c.num_heads),
                     int(c.head_dim), int(c.mlp_dim))
    std = float(c.init_std)
    self.embed = _param(rngs, (int(c.vocab_size), e), std, ('vocab', 'embed'))
    self.position_bias = _param(rngs, (int(c.relative_buckets), h), std,
                                (None, 'heads'))
    ones = lambda: nnx.Param(jnp.ones((n, e), jnp.float32),
                             out_sharding=('layers', 'embed'))
    self.attn_norm, self.mlp_norm = ones(), ones()
    self.wq = _param(rngs, (n, e, h, d), std, ('layers', 'embed', 'heads', None))
    self.wk = _param(rngs, (n, e, h, d), std, ('layers', 'embed', 'heads', None))
    self.wv = _param(rngs, (n, e, h, d), std, ('layers', 'embed', 'heads', None))
    self.wo = _param(rngs, (n, h, d, e), std, ('layers', 'heads', None, 'embed'))
    self.mlp_in = _param(rngs, (n, e, f), std, ('layers', 'embed', 'mlp'))
    if c.mlp == 'gated-gelu':   # gelu(x @ gate) * (x @ in)
      self.mlp_gate = _param(rngs, (n, e, f), std, ('layers', 'embed', 'mlp'))
    self.mlp_out = _param(rngs, (n, f, e), std, ('layers', 'mlp', 'embed'))
    self.final_norm = nnx.Param(jnp.ones((e,), jnp.float32),
                                out_sharding=('embed',))

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    dt = _DTYPES[c.dtype]
    eps = float(c.norm_eps)
    t = ids.shape[1]
    buckets = relative_buckets(t, t, int(c.relative_buckets),
                               int(c.relative_max_distance))
    # The encoder runs once per batch on a short text: its weights are
    # gathered whole (FSDP's gather, for every layer at once) and only the
    # batch is split, which every mesh, Explicit ones included, accepts.
    table = rules.gather(self.position_bias[...])
    bias = jnp.transpose(table[buckets], (2, 0, 1))                    # [H,T,T]
    # Padded keys: the dtype's lowest value, as T5's reference adds.
    keep = mask.astype(bool)[:, None, None, :]
    gated = c.mlp == 'gated-gelu'

    def layer(x, p):
      y = _norm(x, p['attn_norm'], eps).astype(dt)
      q = jnp.einsum('bte,ehd->bhtd', y, p['wq'].astype(dt))
      k = jnp.einsum('bte,ehd->bhtd', y, p['wk'].astype(dt))
      v = jnp.einsum('bte,ehd->bhtd', y, p['wv'].astype(dt))
      logits = jnp.einsum('bhqd,bhkd->bhqk', q, k,
                          preferred_element_type=jnp.float32) + bias
      logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
      w = jax.nn.softmax(logits, axis=-1).astype(dt)
      o = jnp.einsum('bhqk,bhkd->bqhd', w, v)
      x = x + jnp.einsum('bqhd,hde->bqe', o, p['wo'].astype(dt)).astype(x.dtype)
      y = _norm(x, p['mlp_norm'], eps).astype(dt)
      hid = y @ p['mlp_in'].astype(dt)
      if gated:   # T5 v1.1's gelu is the tanh approximation
        hid = jax.nn.gelu(y @ p['mlp_gate'].astype(dt), approximate=True) * hid
      else:
        hid = jax.nn.relu(hid)
      return x + (hid @ p['mlp_out'].astype(dt)).astype(x.dtype), None

    names = ('attn_norm', 'mlp_norm', 'wq', 'wk', 'wv', 'wo', 'mlp_in',
             'mlp_out') + (('mlp_gate',) if gated else ())
    stacked = rules.gather({name: getattr(self, name)[...] for name in names})
    x = rules.take_rows(rules.gather(self.embed[...]), ids).astype(jnp.float32)
    x, _ = jax.lax.scan(layer, x, stacked)
    return _norm(x, rules.gather(self.final_norm[...]), eps).astype(jnp.float32)
