"""Loads a HeartCodec checkpoint folder (heartlib's layout) into our decoder.

The folder is what heartlib's `HeartCodec.save_pretrained` writes and
`from_pretrained` reads: config.json (model_type 'heartcodec') and
model.safetensors, or shards model-0000i-of-0000n.safetensors listed in
model.safetensors.index.json. Only safetensors are read (nothing unpickled).

Every decoder tensor maps onto exactly one of our arrays, with its shape
checked against the config; tensors decode never reads are named in
`IGNORED` (encoder side, VQ training statistics) and anything else is an
error, as is a missing tensor, a wrong shape or a truncated file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from musicjax.codec.heartcodec import config as config_lib
from musicjax.codec.heartcodec.decoder import HeartCodecDecoder
from musicjax.config import flatten
from musicjax.errors import UserError

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
CONFIG = 'config.json'

# Tensors heartlib's checkpoint holds that decoding never reads.
IGNORED = (
    # The waveform encoder of the scalar-quantized codec.
    r'scalar_model\.encoder\..*',
    # The VQ's input projection (encoding) and its codebooks' EMA statistics.
    r'flow_matching\.vq_embed\.project_in\..*',
    r'flow_matching\.vq_embed\.layers\.\d+\._codebook\.'
    r'(initted|cluster_size|embed_avg)',
    # Condition for frames past the codes' length; detokenize conditions
    # every frame, and the unconditional branch of guidance uses zeros.
    r'flow_matching\.zero_cond_embedding1',
)


class HeartCodecWeightsError(UserError, ValueError):
  """A HeartCodec folder that cannot be loaded; the message names the file and
  the tensor."""


# ---- torch layout -> ours --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Rule:
  to_ours: Callable[[np.ndarray], np.ndarray]
  torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # from our shape


def _rotary_order(d: int) -> np.ndarray:
  # heartlib rotates adjacent pairs (0, 1), (2, 3), ...; our attention rotates
  # (i, i + d/2). Reordering q and k alike leaves q.k unchanged.
  return np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])


_VEC = _Rule(lambda w: w, lambda s: s)
_LINEAR = _Rule(lambda w: w.T, lambda s: (s[1], s[0]))
_CONV = _Rule(lambda w: w.transpose(2, 1, 0), lambda s: (s[2], s[1], s[0]))
_WN_G = _Rule(lambda w: w.reshape(-1), lambda s: (s[0], 1, 1))
_CODEBOOK = _Rule(lambda w: w[0], lambda s: (1,) + s)


def _qk_rule(heads: int, d: int) -> _Rule:
  order = _rotary_order(d)
  return _Rule(lambda w: w.T.reshape(w.shape[1], heads, d)[..., order],
               lambda s: (s[1] * s[2], s[0]))


def _v_rule(heads: int, d: int) -> _Rule:
  return _Rule(lambda w: w.T.reshape(w.shape[1], heads, d),
               lambda s: (s[1] * s[2], s[0]))


def _o_rule(heads: int, d: int) -> _Rule:
  return _Rule(lambda w: w.T.reshape(heads, d, w.shape[0]),
               lambda s: (s[2], s[0] * s[1]))


# Transposed conv [in, out, 2 * stride] -> polyphase [tap, in, stride, out]
# with tap j holding kernel positions (1 - j) * stride + r.
_UP_V = _Rule(
    lambda w: w.reshape(w.shape[0], w.shape[1], 2, -1)[:, :, ::-1]
    .transpose(2, 0, 3, 1),
    lambda s: (s[1], s[3], 2 * s[2]))


@dataclasses.dataclass(frozen=True)
class _Source:
  names: list[str]      # one heartlib tensor, or one per entry of our axis 0
  rule: _Rule
  stacked: bool = False


def _sources(c: ml_collections.ConfigDict) -> dict[str, _Source]:
  """Our state path -> the heartlib tensor(s) it is read from."""
  e, s = c.estimator, c.scalar
  h, d = int(e.num_heads), int(e.head_dim)
  m: dict[str, _Source] = {}
  fm, est = 'flow_matching.', 'flow_matching.estimator.'

  def one(ours, theirs, rule):
    m[ours] = _Source([theirs], rule)

  m['codes/codebooks'] = _Source(
      [f'{fm}vq_embed.layers.{q}._codebook.embed'
       for q in range(int(c.codes.num_quantizers))], _CODEBOOK, stacked=True)
  for ours, theirs in (('codes/project', 'vq_embed.project_out'),
                       ('codes/features', 'cond_feature_emb')):
    one(f'{ours}/w', f'{fm}{theirs}.weight', _LINEAR)
    one(f'{ours}/b', f'{fm}{theirs}.bias', _VEC)

  for ours, theirs in (('proj_in', 'proj_in'), ('connect', 'connection_proj'),
                       ('proj_out', 'proj_out')):
    one(f'estimator/{ours}/conv_w', f'{est}{theirs}.ffn_1.weight', _CONV)
    one(f'estimator/{ours}/conv_b', f'{est}{theirs}.ffn_1.bias', _VEC)
    one(f'estimator/{ours}/linear/w', f'{est}{theirs}.ffn_2.weight', _LINEAR)
    one(f'estimator/{ours}/linear/b', f'{est}{theirs}.ffn_2.bias', _VEC)
  for i, suffix in ((1, ''), (2, '_2')):
    one(f'estimator/table_{i}', f'{est}scale_shift_table{suffix}', _VEC)
    ada = f'{est}adaln_single{suffix}.'
    for ours, theirs in (('embed_in', 'emb.timestep_embedder.linear_1'),
                         ('embed_out', 'emb.timestep_embedder.linear_2'),
                         ('modulation', 'linear')):
      one(f'estimator/time_{i}/{ours}/w', f'{ada}{theirs}.weight', _LINEAR)
      one(f'estimator/time_{i}/{ours}/b', f'{ada}{theirs}.bias', _VEC)

  for i, blocks, layers, hd in ((1, 'transformer_blocks', e.num_layers, d),
                                (2, 'transformer_blocks_2', e.num_layers_2,
                                 2 * d)):
    def per_layer(name, n=int(layers), blocks=blocks):
      return [f'{est}{blocks}.{j}.{name}' for j in range(n)]
    ours = f'estimator/stack_{i}/layers/'
    for path, theirs, rule in (
        ('table', 'scale_shift_table', _VEC),
        ('attn_norm/scale', 'attn_norm.weight', _VEC),
        ('mlp_norm/scale', 'mlp_norm.weight', _VEC),
        ('attn/wq', 'attn.q_proj.weight', _qk_rule(h, hd)),
        ('attn/wk', 'attn.k_proj.weight', _qk_rule(h, hd)),
        ('attn/wv', 'attn.v_proj.weight', _v_rule(h, hd)),
        ('attn/wo', 'attn.o_proj.weight', _o_rule(h, hd)),
        ('mlp/gate', 'mlp.gate.weight', _LINEAR),
        ('mlp/up', 'mlp.up.weight', _LINEAR),
        ('mlp/down', 'mlp.down.weight', _LINEAR)):
      m[ours + path] = _Source(per_layer(theirs), rule, stacked=True)

  sq = 'scalar_model.decoder.'

  def wn_conv(ours, theirs):
    one(f'{ours}/v', f'{theirs}.parametrizations.weight.original1', _CONV)
    one(f'{ours}/g', f'{theirs}.parametrizations.weight.original0', _WN_G)
    one(f'{ours}/bias', f'{theirs}.bias', _VEC)

  wn_conv('scalar/delay', f'{sq}0')
  n_up = len(s.upsample_factors)
  for b in range(n_up):
    theirs = f'{sq}{b + 1}'
    up = f'{theirs}.up_conv.layer'
    one(f'scalar/blocks/{b}/up/v', f'{up}.parametrizations.weight.original1',
        _UP_V)
    one(f'scalar/blocks/{b}/up/g', f'{up}.parametrizations.weight.original0',
        _WN_G)
    one(f'scalar/blocks/{b}/up/bias', f'{up}.bias', _VEC)
    for u in range(len(s.res_dilations)):
      ours = f'scalar/blocks/{b}/units/{u}'
      wn_conv(f'{ours}/conv1', f'{theirs}.convs.{u}.conv1')
      wn_conv(f'{ours}/conv2', f'{theirs}.convs.{u}.conv2')
      one(f'{ours}/act1/slope', f'{theirs}.convs.{u}.activation1.weight', _VEC)
      one(f'{ours}/act2/slope', f'{theirs}.convs.{u}.activation2.weight', _VEC)
  one('scalar/repeat_w', f'{sq}{n_up + 1}.conv.weight', _CONV)
  one('scalar/repeat_b', f'{sq}{n_up + 1}.conv.bias', _VEC)
  one('scalar/repeat_act/slope', f'{sq}{n_up + 1}.activation.weight', _VEC)
  wn_conv('scalar/out', f'{sq}{n_up + 2}')
  return m


# ---- reading the folder -----------------------------------------------------
class _Reader:
  """Tensors of a folder's safetensors file(s), by name, as float32 numpy."""

  def __init__(self, folder: str):
    self.folder = folder
    self._handles: dict[tuple[str, str], object] = {}
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          self.files = dict(json.load(f)['weight_map'])
      except (ValueError, KeyError, TypeError) as err:
        raise HeartCodecWeightsError(
            f'{index}: not a safetensors index ({err})') from None
    elif os.path.isfile(os.path.join(folder, SINGLE)):
      self.files = {n: SINGLE for n in self._open(SINGLE).keys()}
    else:
      raise HeartCodecWeightsError(
          f'{folder}: no {SINGLE} or {INDEX} (not a HeartCodec checkpoint '
          'folder, or an incomplete download)')

  def _open(self, fname: str, framework: str = 'np'):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    key = (fname, framework)
    handles = self._handles
    if key not in handles:
      path = os.path.join(self.folder, fname)
      if not os.path.isfile(path):
        raise HeartCodecWeightsError(f'{path}: missing (listed in {INDEX})')
      try:
        handles[key] = safe_open(path, framework=framework)
      except Exception as err:  # safetensors raises its own error types
        raise HeartCodecWeightsError(
            f'{path}: not a readable safetensors file ({err}); it may be '
            'truncated: download it again') from None
    return handles[key]

  def path(self, name: str) -> str:
    return os.path.join(self.folder, self.files.get(name, SINGLE))

  def _handle(self, name: str, framework: str = 'np'):
    h = self._open(self.files[name], framework)
    if name not in h.keys():
      raise HeartCodecWeightsError(
          f'{self.path(name)}: tensor {name!r} listed in {INDEX} is not in '
          'the file')
    return h

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    h = self._handle(name)
    try:
      if h.get_slice(name).get_dtype() == 'BF16':  # numpy has no bfloat16
        return np.asarray(self._handle(name, 'flax').get_tensor(name),
                          np.float32)
      return np.asarray(h.get_tensor(name), np.float32)
    except Exception as err:  # a file cut short fails here
      raise HeartCodecWeightsError(
          f'{self.path(name)}: tensor {name!r} unreadable ({err})') from None


def read_config(folder: str,
                config: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """Our config for the folder's config.json. With `config`, its model numbers
  must be the folder's (decode settings, flow.*, are taken from it)."""
  path = os.path.join(folder, CONFIG)
  if not os.path.isfile(path):
    raise HeartCodecWeightsError(f'{folder}: no {CONFIG} (not a HeartCodec '
                                 'checkpoint folder)')
  try:
    with open(path) as f:
      d = json.load(f)
  except ValueError as err:
    raise HeartCodecWeightsError(f'{path}: not JSON ({err})') from None
  if not isinstance(d, dict):
    raise HeartCodecWeightsError(f'{path}: not a JSON object')
  built = config_lib.from_heartlib_config(d, base=config, where=path)
  if config is not None:
    ours, theirs = flatten(config), flatten(built)
    for key in sorted(theirs):
      if ours.get(key) != theirs[key]:
        raise HeartCodecWeightsError(
            f'{path} gives {key} = {theirs[key]!r}, the config '
            f'{ours.get(key)!r}: a config of another model')
  return built


def _abstract_state(c: ml_collections.ConfigDict):
  # Shapes only: the arrays come from the files (no random init of ~1.6B
  # parameters); no mesh, so the sharding annotations stay metadata.
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: HeartCodecDecoder(c, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)


def _key(path) -> str:
  return '/'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path)


def _check(c, state, shapes: dict[str, tuple[int, ...]],
           where: Callable[[str], str]) -> dict[str, _Source]:
  sources = _sources(c)
  used: set[str] = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)):
    key = _key(path)
    if key not in sources:
      raise AssertionError(f'no heartlib tensor mapped to {key}')  # our bug
    src = sources[key]
    want = src.rule.torch_shape(
        tuple(leaf.shape[1:]) if src.stacked else tuple(leaf.shape))
    for name in src.names:
      if name not in shapes:
        raise HeartCodecWeightsError(
            f'{where(name)}tensor {name!r} is missing (needed for {key}; a '
            'checkpoint of another HeartCodec version?)')
      if tuple(shapes[name]) != want:
        raise HeartCodecWeightsError(
            f'{where(name)}tensor {name!r} has shape {tuple(shapes[name])}, '
            f'the config gives {want}')
      if name in used:
        raise AssertionError(f'{name} mapped twice')  # our bug
      used.add(name)
  ignored = [re.compile(p) for p in IGNORED]
  extra = sorted(n for n in set(shapes) - used
                 if not any(p.fullmatch(n) for p in ignored))
  if extra:
    raise HeartCodecWeightsError(
        f'{where(extra[0])}tensors the HeartCodec decoder does not have: '
        f'{", ".join(extra[:5])}{" ..." if len(extra) > 5 else ""} '
        '(a checkpoint of another model or version?)')
  return sources


def check_layout(c: ml_collections.ConfigDict,
                 shapes: dict[str, tuple[int, ...]]) -> None:
  """Checks a checkpoint's tensor names and shapes (name -> shape) against the
  decoder `c` describes, without any values: every tensor we need is there
  with its shape, and every other one is in IGNORED.

  Raises:
    HeartCodecWeightsError: naming the tensor.
  """
  _, state = _abstract_state(c)
  _check(c, state, shapes, lambda name: '')


def load(folder: str, config: ml_collections.ConfigDict | None = None
         ) -> HeartCodecDecoder:
  """The decoder of a HeartCodec checkpoint folder.

  Args:
    folder: holds config.json and the safetensors weights.
    config: optional; must describe the same model (see read_config). Its
      flow.* settings (windows, steps, guidance) apply; by default heartlib's.

  Raises:
    HeartCodecWeightsError / ConfigError: naming the file and tensor or key.
  """
  c = read_config(folder, config)
  reader = _Reader(folder)
  gdef, state = _abstract_state(c)
  shapes = {name: reader.shape(name) for name in reader.files}
  sources = _check(c, state, shapes, lambda name: f'{reader.path(name)}: ')

  def fill(path, leaf):
    src = sources[_key(path)]
    arrays = [src.rule.to_ours(reader.get(name)) for name in src.names]
    value = np.stack(arrays) if src.stacked else arrays[0]
    return jax.numpy.asarray(value.astype(leaf.dtype))

  pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(gdef, state)
