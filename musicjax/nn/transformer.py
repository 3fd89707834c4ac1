"""Llama-style transformer blocks shared by every model family.

RMSNorm, rotary position embeddings (rotate-half layout: the first and second
halves of each head dimension form the complex pairs), SwiGLU feed-forward and
grouped-query attention. Layers are stacked with `nnx.vmap` (one parameter
array per weight with a leading 'layers' axis) and run with `lax.scan`, so a
deep model compiles one block.

One attention path serves training, prefill and decode:
  * no cache: a [T, T] mask (causal, or bidirectional for masked models)
    combined with per-token validity;
  * with a cache: keys/values of the new tokens are written at `cache_index`
    into a static cache [layers, batch, kv_heads, seq, head_dim], and queries
    attend to every valid slot up to their own. The cache is carried through
    the layer scan and updated with dynamic-update-slices, which XLA performs
    in place inside a decode loop.

Positions are explicit per token, so left-padded prompts (a batch of different
prompt lengths, or classifier-free-guidance rows with a shorter null
condition) get the same rotary phases as in training.

Switches for models that are not Llama-shaped (MusicGen's decoder): LayerNorm
with a bias instead of RMSNorm (`norm`), a plain GELU MLP instead of SwiGLU
(`mlp`), sinusoidal positions added to the inputs instead of rotary phases
(`positions`), and cross-attention to a context such as text-encoder states
after each self-attention (`cross_attention`), whose keys and values a
decode loop computes once (`Transformer.cross_context`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicjax.errors import ConfigError
from musicjax.nn import lora
from musicjax.parallel import rules

Cache = dict[str, jax.Array]

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Masked attention logits: large and finite, so a query whose keys are all
# masked (a padding slot) gives a uniform average instead of NaN.
_MASKED = -1e30


def default_config() -> ml_collections.ConfigDict:
  """Hyper-parameters of one transformer stack (configs override all of them)."""
  c = ml_collections.ConfigDict()
  c.num_layers = 4
  c.dim = 256
  c.num_heads = 4
  c.num_kv_heads = 2
  c.head_dim = 0            # 0: dim // num_heads
  c.mlp_dim = 1024
  c.rope_theta = 10000.0
  # Rotary frequency scaling: 'none' or 'llama3' (Llama 3.1+ and HeartMuLa:
  # wavelengths above original_context / low_freq_factor slow down by
  # scale_factor, those below original_context / high_freq_factor stay, and
  # the band between blends the two).
  c.rope_scaling = 'none'
  c.rope_scale_factor = 32.0
  c.rope_low_freq_factor = 1.0
  c.rope_high_freq_factor = 4.0
  c.rope_original_context = 8192
  c.norm_eps = 1e-5
  c.init_std = 0.02
  c.dtype = 'float32'       # compute dtype of matmuls (params stay float32)
  c.remat = 'none'          # none | full | dots (save matmul outputs)
  # Scan over layers (one compiled block; deep models) or unroll them (small
  # stacks: XLA:CPU lays out the scanned backward with transposing copies that
  # cost more than the matmuls, measured on configs/lm/bench_tiny.py).
  c.scan_layers = True
  # Queries per attention block (0 = all at once). Long sequences (a full song
  # of a bidirectional model) would otherwise hold [heads, T, T] scores; in
  # blocks the peak is [heads, chunk, T], and the backward recomputes a block's
  # scores instead of storing them.
  c.attention_chunk = 0
  c.norm = 'rms'            # rms | layer (LayerNorm with bias: MusicGen)
  c.mlp = 'swiglu'          # swiglu | gelu (fc1 -> exact GELU -> fc2: MusicGen)
  # rope | sinusoidal (added to the stack's inputs: MusicGen) | none (the
  # caller adds its own)
  c.positions = 'rope'
  # Attend to a context (e.g. text-encoder states projected to `dim`) after
  # each self-attention, with its own pre-norm (MusicGen).
  c.cross_attention = False
  return c


NORMS = ('rms', 'layer')
MLPS = ('swiglu', 'gelu')
POSITIONS = ('rope', 'sinusoidal', 'none')


def head_dim(c: ml_collections.ConfigDict) -> int:
  return int(c.head_dim) or int(c.dim) // int(c.num_heads)


def check_config(c: ml_collections.ConfigDict, where: str) -> None:
  for key in ('num_layers', 'dim', 'num_heads', 'num_kv_heads', 'mlp_dim'):
    if int(c[key]) < 1:
      raise ConfigError(f'config.{where}.{key} must be >= 1, got {c[key]}')
  if c.num_heads % c.num_kv_heads:
    raise ConfigError(f'config.{where}.num_heads={c.num_heads} must be a '
                      f'multiple of num_kv_heads={c.num_kv_heads} (grouped-'
                      'query attention shares each KV head by a group)')
  if not c.head_dim and c.dim % c.num_heads:
    raise ConfigError(f'config.{where}.dim={c.dim} is not divisible by '
                      f'num_heads={c.num_heads}; set head_dim explicitly')
  if head_dim(c) % 2:
    raise ConfigError(f'config.{where}: head_dim {head_dim(c)} must be even '
                      '(rotary embeddings rotate pairs)')
  if c.dtype not in _DTYPES:
    raise ConfigError(f'config.{where}.dtype must be one of {sorted(_DTYPES)}, '
                      f'got {c.dtype!r}')
  if int(c.get('attention_chunk', 0)) < 0:
    raise ConfigError(f'config.{where}.attention_chunk must be >= 0 (0 = off), '
                      f'got {c.attention_chunk}')
  if c.get('rope_scaling', 'none') not in ('none', 'llama3'):
    raise ConfigError(f"config.{where}.rope_scaling must be 'none' or 'llama3', "
                      f'got {c.rope_scaling!r}')
  if c.get('rope_scaling', 'none') == 'llama3':
    if not c.rope_scale_factor >= 1:
      raise ConfigError(f'config.{where}.rope_scale_factor must be >= 1, got '
                        f'{c.rope_scale_factor}')
    if not 0 < c.rope_low_freq_factor < c.rope_high_freq_factor:
      raise ConfigError(
          f'config.{where}: need 0 < rope_low_freq_factor < '
          f'rope_high_freq_factor, got {c.rope_low_freq_factor} and '
          f'{c.rope_high_freq_factor}')
    if int(c.rope_original_context) < 1:
      raise ConfigError(f'config.{where}.rope_original_context must be >= 1, '
                        f'got {c.rope_original_context}')
  for key, allowed in (('norm', NORMS), ('mlp', MLPS),
                       ('positions', POSITIONS)):
    if c.get(key, allowed[0]) not in allowed:
      raise ConfigError(f'config.{where}.{key} must be one of {allowed}, got '
                        f'{c.get(key)!r}')
  if c.remat not in ('none', 'full', 'dots'):
    raise ConfigError(f"config.{where}.remat must be 'none', 'full' or 'dots', "
                      f'got {c.remat!r}')


def _param(rngs: nnx.Rngs, shape, std: float, names) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   out_sharding=names)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=('embed',))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    scale = rules.shard_activation(self.scale[...], (None,))
    return (y * scale).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (statistics in float32)."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=('embed',))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=('embed',))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    scale = rules.shard_activation(self.scale[...], (None,))
    bias = rules.shard_activation(self.bias[...], (None,))
    return (y * scale + bias).astype(x.dtype)


def make_norm(c: ml_collections.ConfigDict) -> nnx.Module:
  cls = LayerNorm if c.get('norm', 'rms') == 'layer' else RMSNorm
  return cls(int(c.dim), float(c.norm_eps))


@dataclasses.dataclass(frozen=True)
class Rotary:
  """Rotary phases of one stack: base theta and optional Llama-3 scaling."""
  theta: float
  scaling: str = 'none'
  scale_factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_context: int = 8192

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> 'Rotary':
    if c.get('rope_scaling', 'none') == 'none':
      return cls(float(c.rope_theta))
    return cls(float(c.rope_theta), str(c.rope_scaling),
               float(c.rope_scale_factor), float(c.rope_low_freq_factor),
               float(c.rope_high_freq_factor), int(c.rope_original_context))

  def frequencies(self, half: int) -> jax.Array:
    """Angular frequency of each of the `half` rotated pairs, float32."""
    freq = self.theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if self.scaling == 'none':
      return freq
    wavelength = 2 * jnp.pi / freq
    smooth = ((self.original_context / wavelength - self.low_freq_factor)
              / (self.high_freq_factor - self.low_freq_factor))
    blended = (1 - smooth) * freq / self.scale_factor + smooth * freq
    return jnp.where(
        wavelength < self.original_context / self.high_freq_factor, freq,
        jnp.where(wavelength > self.original_context / self.low_freq_factor,
                  freq / self.scale_factor, blended))


def sinusoidal(positions: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal position vectors [B, T, dim] of integer positions [B, T]
  (tensor2tensor's layout, MusicGen's): cosines of `dim // 2` frequencies
  from 1 down to 1/10000, then their sines; float32."""
  half = dim // 2
  step = jnp.float32(jnp.log(10000.0) / (half - 1))
  freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)
  angle = positions.astype(jnp.float32)[..., None] * freq
  out = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)
  if dim % 2:
    out = jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, 1)])
  return out


def rope(x: jax.Array, positions: jax.Array, rotary: Rotary) -> jax.Array:
  """Rotary embedding of x [B, T, H, D] at integer positions [B, T]."""
  half = x.shape[-1] // 2
  freq = rotary.frequencies(half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B,T,1,half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _attend_full(q, k, v, mask):
  b, t, h, d = q.shape
  kv = k.shape[1]
  q = q.reshape(b, t, kv, h // kv, d)
  s = jnp.einsum('btkgd,bksd->bkgts', q, k,
                 preferred_element_type=jnp.float32) * (d ** -0.5)
  s = jnp.where(mask[:, None, None], s, _MASKED)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum('bkgts,bksd->btkgd', p, v)
  return o.reshape(b, t, h, d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           chunk: int = 0) -> jax.Array:
  """Grouped-query attention. q [B,T,H,D]; k, v [B,KV,S,D]; mask [B,T,S] or
  [B,1,S] (the same keys for every query) bool.

  The query heads of a group share one KV head. Scores and softmax in float32.
  With `chunk` > 0 and T > chunk, queries run in blocks of `chunk` (exact:
  each query's softmax is over all its keys either way).
  """
  b, t, h, d = q.shape
  if chunk <= 0 or t <= chunk:
    return _attend_full(q, k, v, mask)
  n = -(-t // chunk)
  pad = n * chunk - t
  qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qb = jnp.moveaxis(qb.reshape(b, n, chunk, h, d), 1, 0)
  if mask.shape[1] == 1:
    block = jax.checkpoint(lambda qc: _attend_full(qc, k, v, mask))
    out = jax.lax.map(block, qb)
  else:
    mb = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    mb = jnp.moveaxis(mb.reshape(b, n, chunk, mask.shape[-1]), 1, 0)
    block = jax.checkpoint(lambda a: _attend_full(a[0], k, v, a[1]))
    out = jax.lax.map(block, (qb, mb))
  return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, h, d)[:, :t]


def _add_projections(module: nnx.Module, c: ml_collections.ConfigDict,
                     rngs: nnx.Rngs) -> None:
  """q, k, v [dim, heads, head_dim] (k, v over the KV heads) and the output
  [heads, head_dim, dim] of self- and cross-attention."""
  e, h, kv, d = int(c.dim), int(c.num_heads), int(c.num_kv_heads), head_dim(c)
  std = float(c.init_std)
  module.wq = _param(rngs, (e, h, d), std, ('embed', 'heads', None))
  module.wk = _param(rngs, (e, kv, d), std, ('embed', 'kv_heads', None))
  module.wv = _param(rngs, (e, kv, d), std, ('embed', 'kv_heads', None))
  module.wo = _param(rngs, (h, d, e), std, ('heads', None, 'embed'))


_ATTN_WEIGHTS = {'wq': (0, 1), 'wk': (0, 1), 'wv': (0, 1), 'wo': (0, 2)}


def _weight(m: nnx.Module, name: str, names) -> jax.Array:
  """An attention weight laid out by logical `names`: FSDP's 'embed' dim
  lives sharded between steps and is gathered here."""
  return rules.shard_activation(lora.read(m, name).astype(m.dtype), names)


class Attention(nnx.Module):
  ADAPTABLE = _ATTN_WEIGHTS   # lora.py: (batch dims, contracted dims)

  def __init__(self, c: ml_collections.ConfigDict, rngs: nnx.Rngs):
    _add_projections(self, c, rngs)
    self.rotary = (Rotary.from_config(c) if c.get('positions', 'rope') == 'rope'
                   else None)
    self.dtype = _DTYPES[c.dtype]
    self.chunk = int(c.get('attention_chunk', 0))

  def __call__(self, x, positions, mask, cache=None, layer=None, index=None):
    dt = self.dtype
    x = x.astype(dt)
    heads, kv = (None, 'heads', None), (None, 'kv_heads', None)
    q = jnp.einsum('bte,ehd->bthd', x, _weight(self, 'wq', heads))
    k = jnp.einsum('bte,ehd->bhtd', x, _weight(self, 'wk', kv))
    v = jnp.einsum('bte,ehd->bhtd', x, _weight(self, 'wv', kv))
    if self.rotary is not None:
      q = rope(q, positions, self.rotary)
      k = jnp.swapaxes(rope(jnp.swapaxes(k, 1, 2), positions, self.rotary), 1, 2)
    q = rules.shard_activation(q, ('batch', 'time', 'heads', None))
    if cache is not None:
      # Write this layer's new keys/values at [index, index + T) in place.
      start = (layer, 0, 0, index, 0)
      cache = dict(cache,
                   k=jax.lax.dynamic_update_slice(
                       cache['k'], k[None].astype(cache['k'].dtype), start),
                   v=jax.lax.dynamic_update_slice(
                       cache['v'], v[None].astype(cache['v'].dtype), start))
      k = jax.lax.dynamic_index_in_dim(cache['k'], layer, 0, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(cache['v'], layer, 0, keepdims=False)
    o = attend(q, k.astype(dt), v.astype(dt), mask, self.chunk)
    out = rules.einsum('bthd,hde->bte', o,
                       _weight(self, 'wo', ('heads', None, None)),
                       ('batch', 'time', 'embed'))
    return out, cache


@jax.custom_vjp
def swiglu_mlp(x: jax.Array, g: jax.Array, u: jax.Array, d: jax.Array) -> jax.Array:
  """(silu(x @ g) * (x @ u)) @ d over x [N, E], with a hand-written backward.

  The weight gradients contract over the N tokens. Left to itself, XLA:CPU
  feeds those matmuls by transposing the [N, F] activation gradients, with the
  SwiGLU derivative fused into the strided transposing loop, which cost more
  than the matmuls (2 x 130 ms of a 1.6 s step on configs/lm/bench_tiny.py).
  Here the small [N, E] input is transposed once instead (a plain copy) and
  every matmul is a row-major GEMM.
  """
  return (jax.nn.silu(x @ g) * (x @ u)) @ d


def _swiglu_mlp_fwd(x, g, u, d):
  a, b = x @ g, x @ u
  return (jax.nn.silu(a) * b) @ d, (x, g, u, d, a, b)


def _swiglu_mlp_bwd(res, dy):
  x, g, u, d, a, b = res
  sig = jax.nn.sigmoid(a)
  silu = a * sig
  h = silu * b
  dh = dy @ d.T
  da = dh * b * (sig * (1 + a * (1 - sig)))
  db = dh * silu
  xt, ht = jax.lax.optimization_barrier((x.T, h.T))
  return (da @ g.T + db @ u.T, xt @ da, xt @ db, ht @ dy)


swiglu_mlp.defvjp(_swiglu_mlp_fwd, _swiglu_mlp_bwd)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  ADAPTABLE = {'gate': (0, 1), 'up': (0, 1), 'down': (0, 1)}

  def __init__(self, c: ml_collections.ConfigDict, rngs: nnx.Rngs):
    e, f, std = int(c.dim), int(c.mlp_dim), float(c.init_std)
    self.gate = _param(rngs, (e, f), std, ('embed', 'mlp'))
    self.up = _param(rngs, (e, f), std, ('embed', 'mlp'))
    self.down = _param(rngs, (f, e), std, ('mlp', 'embed'))
    self.dtype = _DTYPES[c.dtype]

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    g = rules.shard_activation(lora.read(self, 'gate').astype(dt), (None, 'mlp'))
    u = rules.shard_activation(lora.read(self, 'up').astype(dt), (None, 'mlp'))
    d = rules.shard_activation(lora.read(self, 'down').astype(dt), ('mlp', None))
    x = x.astype(dt)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      # One device (no sharding to express): the layout-friendly backward.
      lead = x.shape[:-1]
      y = swiglu_mlp(x.reshape(-1, x.shape[-1]), g, u, d)
      return y.reshape(lead + (d.shape[-1],))
    hid = jax.nn.silu(x @ g) * (x @ u)
    hid = rules.shard_activation(hid, ('batch', 'time', 'mlp'))
    return rules.matmul(hid, d, ('batch', 'time', 'embed'))


class CrossAttention(nnx.Module):
  """Queries from the sequence, keys and values from a context [B, S, dim]
  (no positions); every query sees the context's valid slots."""
  ADAPTABLE = _ATTN_WEIGHTS

  def __init__(self, c: ml_collections.ConfigDict, rngs: nnx.Rngs):
    _add_projections(self, c, rngs)
    self.dtype = _DTYPES[c.dtype]

  def keys_values(self, states: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Context states [B, S, dim] -> k, v [B, KV, S, D]."""
    states = states.astype(self.dtype)
    kv = (None, 'kv_heads', None)
    return (jnp.einsum('bse,ehd->bhsd', states, _weight(self, 'wk', kv)),
            jnp.einsum('bse,ehd->bhsd', states, _weight(self, 'wv', kv)))

  def __call__(self, x: jax.Array, context: 'Context', layer=None) -> jax.Array:
    q = jnp.einsum('bte,ehd->bthd', x.astype(self.dtype),
                   _weight(self, 'wq', (None, 'heads', None)))
    q = rules.shard_activation(q, ('batch', 'time', 'heads', None))
    o = self._attend(q, context, layer)
    return rules.einsum('bthd,hde->bte', o,
                        _weight(self, 'wo', ('heads', None, None)),
                        ('batch', 'time', 'embed'))

  def _attend(self, q, context: 'Context', layer) -> jax.Array:
    dt = self.dtype
    if context.k is None:
      k, v = self.keys_values(context.states)
    elif isinstance(context.k, tuple):   # per layer (`split_context`)
      k, v = context.k[layer], context.v[layer]
    else:   # computed once for a decode loop (Transformer.cross_context)
      k = jax.lax.dynamic_index_in_dim(context.k, layer, 0, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(context.v, layer, 0, keepdims=False)
    return attend(q, k.astype(dt), v.astype(dt), context.valid[:, None, :])

  def fused(self) -> tuple[jax.Array, jax.Array]:
    """(wq [dim, H*D], wo [H*D, dim]) read once for a decode loop: the
    [H, D, dim] output weight read inside the loop was transposed by XLA on
    every step (a quantized one would be dequantized on every step too)."""
    wq, wo = (lora.read(self, n).astype(self.dtype) for n in ('wq', 'wo'))
    e, h, d = wq.shape
    return wq.reshape(e, h * d), wo.reshape(h * d, e)

  def call_fused(self, weights, x: jax.Array, context: 'Context', layer
                 ) -> jax.Array:
    """`__call__` with `fused()`'s weights."""
    wq, wo = weights
    b, t, _ = x.shape
    q = (x.astype(self.dtype) @ wq).reshape(b, t, self.wq.shape[1], -1)
    return self._attend(q, context, layer).reshape(b, t, -1) @ wo


@dataclasses.dataclass(frozen=True)
class Context:
  """What cross-attention reads: states [B, S, dim] and valid slots [B, S];
  optionally every layer's keys and values of them [layers, B, KV, S, D]
  (`Transformer.cross_context`), so a decode step does not recompute them."""
  states: jax.Array
  valid: jax.Array
  k: jax.Array | None = None
  v: jax.Array | None = None


jax.tree_util.register_dataclass(Context, data_fields=['states', 'valid', 'k',
                                                       'v'], meta_fields=[])


class GeluMLP(nnx.Module):
  """down(gelu(up(x))), exact GELU, no biases (MusicGen's fc1/fc2)."""
  ADAPTABLE = {'up': (0, 1), 'down': (0, 1)}

  def __init__(self, c: ml_collections.ConfigDict, rngs: nnx.Rngs):
    e, f, std = int(c.dim), int(c.mlp_dim), float(c.init_std)
    self.up = _param(rngs, (e, f), std, ('embed', 'mlp'))
    self.down = _param(rngs, (f, e), std, ('mlp', 'embed'))
    self.dtype = _DTYPES[c.dtype]

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    u = rules.shard_activation(lora.read(self, 'up').astype(dt), (None, 'mlp'))
    d = rules.shard_activation(lora.read(self, 'down').astype(dt), ('mlp', None))
    hid = jax.nn.gelu(x.astype(dt) @ u, approximate=False)
    hid = rules.shard_activation(hid, ('batch', 'time', 'mlp'))
    return rules.matmul(hid, d, ('batch', 'time', 'embed'))


class Block(nnx.Module):

  def __init__(self, c: ml_collections.ConfigDict, rngs: nnx.Rngs):
    self.attn_norm = make_norm(c)
    self.attn = Attention(c, rngs)
    if c.get('cross_attention', False):
      self.cross_norm = make_norm(c)
      self.cross = CrossAttention(c, rngs)
    self.mlp_norm = make_norm(c)
    self.mlp = GeluMLP(c, rngs) if c.get('mlp', 'swiglu') == 'gelu' else MLP(c, rngs)

  def __call__(self, x, positions, mask, cache=None, layer=None, index=None,
               context: Context | None = None):
    a, cache = self.attn(self.attn_norm(x), positions, mask, cache, layer, index)
    x = x + a.astype(x.dtype)
    if hasattr(self, 'cross'):
      x = x + self.cross(self.cross_norm(x), _needs(context),
                         layer).astype(x.dtype)
    x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
    return x, cache


def _needs(context: Context | None) -> Context:
  if context is None:
    raise ValueError('this stack has cross_attention: pass its context '
                     '(Context(states [B, S, dim], valid [B, S]))')
  return context


_REMAT = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
  """A stack of `num_layers` blocks (scanned) and a final RMSNorm."""

  def __init__(self, c: ml_collections.ConfigDict, rngs: nnx.Rngs):
    self.num_layers = int(c.num_layers)
    self.num_heads = int(c.num_heads)
    self.dtype = _DTYPES[c.dtype]
    self.num_kv_heads = int(c.num_kv_heads)
    self.head_dim = head_dim(c)
    self.remat = c.remat
    self.scan_layers = bool(c.scan_layers)
    self.positions = c.get('positions', 'rope')

    @nnx.split_rngs(splits=self.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make(r):
      return Block(c, r)

    self.layers = make(rngs)
    self.norm = make_norm(c)

  def init_cache(self, batch: int, length: int, dtype=None,
                 per_layer: bool = False) -> Cache:
    """Zeros [layers, batch, kv_heads, length, head_dim] for K and V; with
    `per_layer`, lists of per-layer arrays (the layout `FusedBlock` uses).

    The default dtype is the compute dtype: keys and values are computed in
    it, so a wider cache would hold the same values at twice the bytes read
    per decode step."""
    dtype = self.dtype if dtype is None else dtype
    shape = (self.num_layers, batch, self.num_kv_heads, length, self.head_dim)
    cache = {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
    return split_cache(cache) if per_layer else cache

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: Cache | None = None, index: Any = None,
               context: Context | None = None):
    """x [B,T,E], positions [B,T], mask [B,T,S] (S = T, or the cache length);
    context: what cross-attention reads (config.cross_attention).

    Returns (normed output [B,T,E], updated cache or None).
    """
    gdef, params = nnx.split(self.layers)
    x = add_positions(self.positions, x, positions)
    x = rules.shard_activation(x, ('batch', 'time', 'embed'))

    def body(carry, layer_params):
      h, cache, i = carry
      h, cache = nnx.merge(gdef, layer_params)(h, positions, mask, cache, i,
                                               index, context)
      return (h, cache, i + 1), None

    if self.remat in _REMAT:
      body = jax.checkpoint(body, policy=_REMAT[self.remat])
    if self.scan_layers:
      (h, cache, _), _ = jax.lax.scan(body, (x, cache, jnp.int32(0)), params)
    else:
      carry = (x, cache, jnp.int32(0))
      for i in range(self.num_layers):
        carry, _ = body(carry, jax.tree.map(lambda a, i=i: a[i], params))
      h, cache, _ = carry
    return self.norm(h), cache


  def cross_context(self, context: Context) -> Context:
    """`context` with every layer's cross-attention keys and values, for a
    decode loop (each step would otherwise recompute them from the states)."""
    gdef, params = nnx.split(self.layers)
    kv = jax.vmap(lambda p: nnx.merge(gdef, p).cross.keys_values(
        context.states))(params)
    return dataclasses.replace(context, k=kv[0], v=kv[1])


def add_positions(kind: str, x: jax.Array, positions: jax.Array) -> jax.Array:
  """The stack's input x [B, T, E] with sinusoidal position vectors added
  when `kind` is 'sinusoidal' (rotary phases act inside attention)."""
  if kind != 'sinusoidal':
    return x
  return x + sinusoidal(positions, x.shape[-1]).astype(x.dtype)


def split_cache(cache: Cache) -> dict[str, list[jax.Array]]:
  """A stacked [layers, ...] cache as per-layer lists (one copy, before a
  decode loop). A custom call such as the Pallas decode kernel needs its
  operand as a buffer of its own: a slice of the stacked cache would be
  copied out on every step, a full extra pass over the cache."""
  return {name: [a[i] for i in range(a.shape[0])] for name, a in cache.items()}


class FusedBlock:
  """One block's weights laid out for a decode loop: per layer (sliced out of
  the stacked arrays once, so they are loop invariants; a scan would copy each
  layer's weights out of the stack on every step) and with q/k/v and gate/up
  concatenated, so a one-token step runs 4 matmuls instead of 7 (at decode
  batch sizes each matmul costs mostly its call overhead).

  Its cache is per layer (`split_cache`). `decode_attention`, when given,
  computes one-token steps: `fn(q [B,H,D], k, v [B,KV,S,D], lengths [B],
  valid [B,S]) -> [B,H,D]` (see kernels/dispatch.py); other steps and the
  default use `attend`."""

  def __init__(self, block: Block, decode_attention=None):
    self.decode_attention = decode_attention
    a, m = block.attn, block.mlp
    w = functools.partial(lora.read, a)
    wq, wk = w('wq'), w('wk')
    e, h, d = wq.shape
    kv = wk.shape[1]
    self.h, self.kv, self.d = h, kv, d
    self.rotary, self.dtype = a.rotary, a.dtype
    self.attn_norm, self.mlp_norm = block.attn_norm, block.mlp_norm
    dt = a.dtype
    self.wqkv = jnp.concatenate([wq.reshape(e, h * d), wk.reshape(e, kv * d),
                                 w('wv').reshape(e, kv * d)], 1).astype(dt)
    self.wo = w('wo').reshape(h * d, e).astype(dt)
    self.gated = isinstance(m, MLP)
    w = functools.partial(lora.read, m)
    self.wgu = (jnp.concatenate([w('gate'), w('up')], 1) if self.gated
                else w('up')).astype(m.dtype)
    self.wd = w('down').astype(m.dtype)
    self.cross = getattr(block, 'cross', None)
    self.cross_norm = getattr(block, 'cross_norm', None)
    self.cross_w = None if self.cross is None else self.cross.fused()
    self.input_positions = 'rope'   # fuse() sets the first block's

  def __call__(self, x, positions, mask, cache, layer, index,
               context: Context | None = None):
    x = add_positions(self.input_positions, x, positions)
    b, t, _ = x.shape
    h, kv, d = self.h, self.kv, self.d
    y = self.attn_norm(x).astype(self.dtype)
    qkv = y @ self.wqkv
    q = qkv[..., :h * d].reshape(b, t, h, d)
    k = qkv[..., h * d:(h + kv) * d].reshape(b, t, kv, d)
    if self.rotary is not None:
      q, k = rope(q, positions, self.rotary), rope(k, positions, self.rotary)
    v = qkv[..., (h + kv) * d:].reshape(b, t, kv, d)
    start = (0, 0, index, 0)
    kc, vc = cache['k'][layer], cache['v'][layer]
    kc = jax.lax.dynamic_update_slice(kc, jnp.swapaxes(k, 1, 2).astype(kc.dtype),
                                      start)
    vc = jax.lax.dynamic_update_slice(vc, jnp.swapaxes(v, 1, 2).astype(vc.dtype),
                                      start)
    cache = {'k': _replaced(cache['k'], layer, kc),
             'v': _replaced(cache['v'], layer, vc)}
    if self.decode_attention is not None and t == 1:
      # The kernel reads the cache in its own dtype (no per-step cast copy).
      lengths = jnp.full((b,), index + 1, jnp.int32)
      o = self.decode_attention(q[:, 0].astype(kc.dtype), kc, vc, lengths,
                                mask[:, 0])
      o = o.astype(self.dtype).reshape(b, t, h * d)
    else:
      o = attend(q, kc.astype(self.dtype), vc.astype(self.dtype),
                 mask).reshape(b, t, h * d)
    x = x + (o @ self.wo).astype(x.dtype)
    if self.cross is not None:
      x = x + self.cross.call_fused(self.cross_w, self.cross_norm(x),
                                    _needs(context), layer).astype(x.dtype)
    y = self.mlp_norm(x).astype(self.wgu.dtype)
    gu = y @ self.wgu
    if self.gated:
      f = self.wd.shape[0]
      hid = jax.nn.silu(gu[..., :f]) * gu[..., f:]
    else:
      hid = jax.nn.gelu(gu, approximate=False)
    x = x + (hid @ self.wd).astype(x.dtype)
    return x, cache


def split_context(context: Context | None) -> Context | None:
  """`cross_context`'s stacked keys and values as per-layer tuples, for the
  fused blocks (call before a decode loop: a layer's slice taken inside the
  loop was copied out of the stack on every step)."""
  if context is None or context.k is None:
    return context
  n = context.k.shape[0]
  return dataclasses.replace(context, k=tuple(context.k[i] for i in range(n)),
                             v=tuple(context.v[i] for i in range(n)))


def _replaced(items: list, i: int, value) -> list:
  return items[:i] + [value] + items[i + 1:]


def fuse(stack: Transformer, decode_attention=None) -> list[FusedBlock]:
  """The stack's blocks as `FusedBlock`s (call before a decode loop)."""
  gdef, params = nnx.split(stack.layers)
  blocks = [FusedBlock(nnx.merge(gdef, jax.tree.map(lambda a, i=i: a[i],
                                                    params)), decode_attention)
            for i in range(stack.num_layers)]
  blocks[0].input_positions = stack.positions
  return blocks


def run_fused(blocks: list[FusedBlock], norm: nnx.Module, x, positions, mask,
              cache: dict[str, list[jax.Array]], index,
              context: Context | None = None
              ) -> tuple[jax.Array, dict[str, list[jax.Array]]]:
  """`Transformer.__call__` with a per-layer cache (`split_cache`), over
  `fuse`d blocks (unrolled)."""
  for i, block in enumerate(blocks):
    x, cache = block(x, positions, mask, cache, i, index, context)
  return norm(x), cache


def causal_mask(valid: jax.Array, causal: bool = True) -> jax.Array:
  """Mask for a whole sequence: valid keys, and earlier ones if causal.
  [B,T,T] when causal, else [B,1,T] (broadcasts over queries)."""
  t = valid.shape[1]
  m = valid[:, None, :]
  if causal:
    m = m & jnp.tril(jnp.ones((t, t), bool))[None]
  return m


def cache_mask(key_valid: jax.Array, index, num_new: int) -> jax.Array:
  """[B,T,S] mask for T new tokens written at `index` into a cache of S slots:
  a query sees valid slots up to and including its own."""
  s = key_valid.shape[1]
  q_slot = index + jnp.arange(num_new)
  ok = jnp.arange(s)[None, :] <= q_slot[:, None]
  return key_valid[:, None, :] & ok[None]
