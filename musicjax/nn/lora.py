"""LoRA adapters and a quantized frozen base on the matmul weights (QLoRA).

A module declares which of its weights may take adapters (`ADAPTABLE`: weight
name -> (leading batch dims, contracted dims)) and reads each of them through
`read`, which returns base + alpha/rank * A @ B, with the base dequantized
first when it is stored in int8/int4. `apply` adds the adapters (A random, B
zero, so the model starts as the base) to the weights a config's patterns
name; only they are `nnx.LoRAParam`, the variables an optimizer over
`nnx.LoRAParam` trains. `merge` folds them back into plain weights.

Why not qwix's LoraProvider: it intercepts each matmul inside a module's call,
finds the weight among the attributes of the module whose Python frame runs
it, and creates the adapters on that module object. Our layers are one
vmap-stacked module run by a scan (compile time independent of depth), so a
layer's matmul runs in a per-layer view made by `nnx.merge` inside the scan:
the adapters land on that view and are lost, and the fused decode blocks read
the weights outside any module call. Here the adapters are attributes of the
stacked module itself, so the scan slices them with the weights, and every
read goes through one function. The quantized base is qwix's own arrays
(`qwix.quantize`, `qwix.dequantize`: per-output-channel int8, or int4 in
groups along the contracted dims). int4 values are stored two to a byte along
the last (output) axis and unpacked where read: XLA:CPU holds an int4 array
in a byte per value and widened each whole stacked int4 array before the layer
loop, while a packed stack is sliced per layer first, then unpacked.

The adapted weight is materialised per layer (inside the layer scan, so one
layer at a time; with remat, again in the backward pass), so a LoRA step
costs about the FLOPs of a full fine-tuning step; what LoRA saves is the
optimizer state and the checkpoints, and QLoRA the weights' memory.
"""
from __future__ import annotations

import fnmatch
import math

import jax
import jax.numpy as jnp
import ml_collections
import qwix
from flax import nnx

from musicjax.errors import ConfigError

BASES = ('float', 'int8', 'int4')
# Inference (config.sample.weights) may also hold the stacks in bfloat16.
SERVING = BASES + ('bfloat16',)
QTYPES = {'int8': jnp.int8, 'int4': jnp.int4}


class Quantized(nnx.Variable):
  """A frozen base weight's integer values or scales: read, never trained,
  never checkpointed (a LoRA run rebuilds its base from `init.workdir`)."""


def enabled(c: ml_collections.ConfigDict) -> bool:
  return int(c.get('lora', {}).get('rank', 0)) > 0


def check_config(c: ml_collections.ConfigDict) -> None:
  """The `lora` section alone (targets are checked against a model by `apply`)."""
  lo = c.lora
  if int(lo.rank) < 0:
    raise ConfigError(f'config.lora.rank must be >= 0 (0 = no adapters), got '
                      f'{lo.rank}')
  if lo.base not in BASES:
    raise ConfigError(f'config.lora.base must be one of {BASES}, got '
                      f'{lo.base!r}')
  if int(lo.rank) > 0 and not lo.targets:
    raise ConfigError('config.lora.targets is empty: name the weights that '
                      "take adapters, e.g. ('*/attn/wq', '*/mlp/*')")
  if int(lo.int4_group) < 1:
    raise ConfigError(f'config.lora.int4_group must be >= 1, got '
                      f'{lo.int4_group}')
  if float(lo.alpha) <= 0:
    raise ConfigError(f'config.lora.alpha must be > 0, got {lo.alpha}')


def _lead(var: nnx.Variable, batch: int) -> int:
  """Leading dims not taking part in the matmul: the stacked layers' plus the
  module's own (e.g. one head per codebook)."""
  names = var.get_metadata().get('out_sharding') or ()
  return sum(1 for n in names if n == 'layers') + batch


def adaptable(model: nnx.Module) -> dict[str, tuple[nnx.Module, str]]:
  """{'backbone/layers/attn/wq': (module, 'wq')} of every weight of `model`
  that `read` serves."""
  out = {}
  for path, m in nnx.iter_modules(model):
    for name in getattr(type(m), 'ADAPTABLE', {}):
      if hasattr(m, name):
        out['/'.join(str(p) for p in (*path, name))] = (m, name)
  return out


def pack_int4(v: jax.Array) -> jax.Array:
  """int4 values [..., n] as int8 [..., ceil(n / 2)]: element 2i in the low
  nibble of byte i, 2i + 1 in the high one (a shard of the bytes holds a
  contiguous run of the values, so the last axis shards as before)."""
  v = v.astype(jnp.int8)
  if v.shape[-1] % 2:
    v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, 1)])
  return (v[..., 0::2] & 0xF) | (v[..., 1::2] << 4)


def unpack_int4(p: jax.Array, n: int) -> jax.Array:
  """The int8 values in [-8, 7] that `pack_int4` packed into `p`; n: the
  unpacked last dim."""
  lo = jnp.left_shift(p, 4) >> 4          # arithmetic shifts sign-extend
  hi = p >> 4
  return jnp.stack([lo, hi], -1).reshape(*p.shape[:-1], -1)[..., :n]


def float_shape(qvalue, scale) -> tuple[int, ...]:
  """The float weight's shape behind quantized values and their scales (int4
  values are packed along the last axis, an output channel's, which the
  scales keep whole)."""
  return tuple(qvalue.shape[:-1]) + (scale.shape[-1],)


def _dequantized(m: nnx.Module, name: str) -> jax.Array:
  base = getattr(m, name)
  if not isinstance(base, Quantized):
    return base[...]
  scale, qtype = getattr(m, name + '_scale')[...], getattr(m, name + '_qtype')
  v = base[...]
  if qtype == 'int4':
    v = unpack_int4(v, scale.shape[-1])   # the last axis is an output's
  return qwix.dequantize(qwix.QArray(qvalue=v, scale=scale,
                                     qtype=QTYPES[qtype]))


def read(m: nnx.Module, name: str) -> jax.Array:
  """Weight `name` of module `m` as a float array: the base (dequantized when
  quantized) plus its adapters' update, when it has adapters."""
  w = _dequantized(m, name)
  a = getattr(m, name + '_lora_a', None)
  if a is None:
    return w
  a, b = a[...], getattr(m, name + '_lora_b')[...]
  n_in = getattr(m, name + '_lora_in')
  lead = a.shape[:a.ndim - 1 - n_in]          # [lead..., in..., r]
  r = a.shape[-1]
  delta = (a.reshape(*lead, -1, r) @ b.reshape(*lead, r, -1)).reshape(w.shape)
  return w + (getattr(m, name + '_lora_scale') * delta).astype(w.dtype)


def _quantize(w: jax.Array, lead: int, n_in: int, base: str, group: int):
  """qwix QArray of w [lead..., in..., out...]: a scale per output channel
  (int8), or per output channel and group of `group` contracted values
  (int4; a dim that `group` does not divide is one group)."""
  contracted = range(lead, lead + n_in)
  channels = [i for i in range(w.ndim) if i not in contracted]
  tiles = None
  if base == 'int4':
    tiles = {i: group for i in contracted if w.shape[i] % group == 0
             and w.shape[i] > group}
  return qwix.quantize(w, QTYPES[base], channelwise_axes=channels,
                       tiled_axes=tiles or None)


def quantize_base(m: nnx.Module, name: str, base: str, group: int) -> None:
  """Stores weight `name` of `m` as `base` integers and scales (in place)."""
  var = getattr(m, name)
  batch, n_in = type(m).ADAPTABLE[name]
  lead = _lead(var, batch)
  names = tuple(var.get_metadata().get('out_sharding') or (None,) * var.ndim)
  q = _quantize(var[...], lead, n_in, base, group)
  scale_names = tuple(None if lead <= i < lead + n_in else n
                      for i, n in enumerate(names))
  values = pack_int4(q.qvalue) if base == 'int4' else q.qvalue
  setattr(m, name, Quantized(values, out_sharding=names, qtype=base))
  setattr(m, name + '_scale', Quantized(q.scale, out_sharding=scale_names))
  setattr(m, name + '_qtype', base)


def requantize(w: jax.Array, qvalue: nnx.Variable, scale: nnx.Variable
               ) -> tuple[jax.Array, jax.Array]:
  """(values, scales) of float `w` quantized as the `qvalue`/`scale`
  variables are: the same type, channels and groups (and int4 packing)."""
  qtype = qvalue.get_metadata()['qtype']
  scale = scale.get_value()
  channels = [i for i in range(w.ndim) if scale.shape[i] == w.shape[i]]
  tiles = {i: w.shape[i] // scale.shape[i] for i in range(w.ndim)
           if 1 < scale.shape[i] < w.shape[i]}
  q = qwix.quantize(w, QTYPES[qtype], channelwise_axes=channels,
                    tiled_axes=tiles or None)
  return (pack_int4(q.qvalue) if qtype == 'int4' else q.qvalue), q.scale


def add_adapters(m: nnx.Module, name: str, rank: int, alpha: float,
                 key: jax.Array) -> None:
  """A [lead..., in..., rank] (He-uniform) and B [lead..., rank, out...]
  (zeros) beside weight `name` of `m`."""
  var = getattr(m, name)
  batch, n_in = type(m).ADAPTABLE[name]
  lead = _lead(var, batch)
  names = tuple(var.get_metadata().get('out_sharding') or (None,) * var.ndim)
  shape = (float_shape(var, getattr(m, name + '_scale'))
           if isinstance(var, Quantized) else tuple(var.shape))
  fan_in = math.prod(shape[lead:lead + n_in])
  bound = math.sqrt(6.0 / fan_in)
  a = jax.random.uniform(key, shape[:lead + n_in] + (rank,), jnp.float32,
                         -bound, bound)
  b = jnp.zeros(shape[:lead] + (rank,) + shape[lead + n_in:], jnp.float32)
  setattr(m, name + '_lora_a', nnx.LoRAParam(
      a, out_sharding=names[:lead + n_in] + (None,)))
  setattr(m, name + '_lora_b', nnx.LoRAParam(
      b, out_sharding=names[:lead] + (None,) + names[lead + n_in:]))
  setattr(m, name + '_lora_in', n_in)
  setattr(m, name + '_lora_scale', float(alpha) / rank)


def targets(model: nnx.Module, patterns, key: str = 'config.lora.targets'
            ) -> list[str]:
  """The adaptable weight paths `patterns` name; a pattern naming none is a
  ConfigError listing what there is."""
  have = adaptable(model)
  chosen = set()
  for pat in patterns:
    hit = [p for p in have if fnmatch.fnmatchcase(p, pat)]
    if not hit:
      some = ', '.join(sorted(have)[:8])
      raise ConfigError(
          f'{key} pattern {pat!r} names no weight that can take adapters; '
          f'they are: {some}{" ..." if len(have) > 8 else ""}')
    chosen.update(hit)
  return sorted(chosen)


def quantize_stacks(model: nnx.Module, base: str, group: int) -> nnx.Module:
  """Stores every adaptable weight of `model`'s transformer stacks as `base`
  (int8 / int4, or bfloat16 for inference; float: unchanged), in place:
  QLoRA's frozen base, and weight-only quantized inference
  (config.sample.weights). Heads and
  embeddings stay float, as QLoRA keeps its output layer."""
  if base == 'float':
    return model
  if base not in SERVING:
    raise ConfigError(f'weights must be one of {SERVING}, got {base!r}')
  with nnx.use_eager_sharding(False):   # placed by the caller's shardings
    for path, (m, name) in adaptable(model).items():
      var = getattr(m, name)
      if 'layers' not in path.split('/') or isinstance(var, Quantized):
        continue
      if base == 'bfloat16':
        setattr(m, name, nnx.Param(var[...].astype(jnp.bfloat16),
                                   **var.get_metadata()))
      else:
        quantize_base(m, name, base, group)
  return model


def apply(model: nnx.Module, c: ml_collections.ConfigDict, rngs: nnx.Rngs
          ) -> nnx.Module:
  """Adds config.lora's adapters to `model` and quantizes its frozen base
  (every adaptable weight of the transformer stacks, adapted or not) when
  config.lora.base says so.
  Returns `model`, changed in place."""
  lo = c.lora
  chosen = targets(model, lo.targets)
  have = adaptable(model)
  quantize_stacks(model, lo.base, int(lo.int4_group))
  with nnx.use_eager_sharding(False):   # placed by the caller's shardings
    for path in chosen:
      m, name = have[path]
      add_adapters(m, name, int(lo.rank), float(lo.alpha), rngs.params())
  return model


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter (and dequantizes every quantized base) into plain
  float `nnx.Param` weights, in place; returns `model`."""
  for m, name in adaptable(model).values():
    var = getattr(m, name)
    adapted = hasattr(m, name + '_lora_a')
    if not adapted and not isinstance(var, Quantized):
      continue
    w = read(m, name).astype(jnp.float32)
    meta = var.get_metadata()
    # The merged array keeps its placement; the names are for later shardings.
    with nnx.use_eager_sharding(False):
      setattr(m, name, nnx.Param(w, out_sharding=meta.get('out_sharding')))
    for extra in ('_lora_a', '_lora_b', '_lora_in', '_lora_scale', '_scale',
                  '_qtype'):
      if hasattr(m, name + extra):
        delattr(m, name + extra)
  return model
