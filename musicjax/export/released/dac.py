"""Loads a DAC (Descript Audio Codec) folder into our codec
(musicjax/codec/model.py); dac_export.py writes one back.

The folder is what Hugging Face transformers' `DacModel.save_pretrained`
writes and `from_pretrained` reads (descript/dac_16khz, dac_24khz,
dac_44khz): config.json (model_type 'dac') and model.safetensors, or shards
listed in model.safetensors.index.json (reader.py). Its convs hold plain
`weight`s; folders saved with torch weight norm applied (`weight_g` /
`weight_v`, or `parametrizations.weight.original0/1`) are folded into plain
weights on reading (`WeightNormFolded`). descript's own weight files
(`.pth`, torch.load with weights_only=True) are read too (`DescriptReader`).

DAC is our codec with fixed settings (`FIXED_MODEL`): residual units of
dilations 1, 3, 9 with kernel 7, strided convs of kernel 2 * stride padded
ceil(stride / 2) on the left (`pad_extra` 'left'), tanh output, factorized
L2-normalised codes. Our convs are weight-normalised (v, g) where DAC's are
plain: each weight is our v, and g is |v| (plus our norm's eps), so g * v /
|v| is the weight again. The quantizer's statistics, which DAC does not
have, start as in a fresh run without k-means (each code counted once, and
marked initialised so no k-means overwrites the released codebooks).
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from musicjax import config as config_lib
from musicjax.codec.model import CodecModel
from musicjax.config import ConfigError
from musicjax.export.released import mapping as M
from musicjax.export.released import reader as reader_lib

SINGLE = reader_lib.SINGLE
CONFIG = M.CONFIG
MODEL_TYPE = 'dac'
ARCHITECTURE = 'DacModel'

# DAC's architecture in our config's terms: DacConfig has no keys for these.
FIXED_MODEL = {
    'model.dilations': (1, 3, 9),      # res_unit1, res_unit2, res_unit3
    'model.residual_kernel': 7,
    'model.stem_kernel': 7,            # encoder and decoder first/last convs
    'model.latent_kernel': 3,
    'model.down_kernel_multiple': 2,
    'model.up_kernel_multiple': 2,
    'model.padding': 'same',
    'model.pad_extra': 'left',         # torch padding=ceil(stride / 2)
    'model.output_tanh': True,
    'model.output_highpass_hz': 0.0,
    'model.normalize': False,
    'model.rvq.factorized': True,
    'model.rvq.codebook_type': 'learned',
    'data.channels': 1,
}
# DacConfig's keys -> ours.
NUMBERS = {
    'encoder_hidden_size': 'model.encoder_dim',
    'downsampling_ratios': 'model.strides',
    'decoder_hidden_size': 'model.decoder_dim',
    'n_codebooks': 'model.rvq.num_codebooks',
    'codebook_size': 'model.rvq.codebook_size',
    'codebook_dim': 'model.rvq.codebook_dim',
    'sampling_rate': 'data.sample_rate',
}
# Training settings DacConfig carries; a run made without --config takes them.
TRAINING = {
    'quantizer_dropout': 'model.rvq.quantizer_dropout',
    'commitment_loss_weight': 'loss.commit_weight',
    'codebook_loss_weight': 'loss.codebook_weight',
}
# Keys DacConfig derives from the others (checked) and PreTrainedConfig's
# bookkeeping (ignored).
DERIVED_KEYS = ('hidden_size', 'hop_length', 'upsampling_ratios')
BOOKKEEPING = ('model_type', 'architectures', 'transformers_version', 'dtype',
               'torch_dtype', '_name_or_path', '_commit_hash', 'return_dict',
               'output_hidden_states', 'output_attentions', 'use_cache',
               'id2label', 'label2id', 'problem_type', 'chunk_size_feed_forward',
               'is_encoder_decoder', 'tie_word_embeddings',
               '_attn_implementation_autoset')
# A run made without --config: what DAC trained with where ours differs.
# DAC has no dead-code restarts, and its released codebooks need no k-means
# start. Segments of about DAC's 0.38 s training excerpts, in whole frames.
RUN_DEFAULTS = {'model.rvq.kmeans_init': False,
                'model.rvq.dead_code_threshold': 0.0}
SEGMENT_SECONDS = 0.38
# WNConv1d's norm_eps (musicjax/nn/conv.py): g = sqrt(|v|^2 + eps) makes
# g * v / sqrt(|v|^2 + eps) exactly v.
CONV_NORM_EPS = 1e-12


class DacWeightsError(reader_lib.WeightsError):
  """A DAC folder that cannot be loaded; the message names the file and the
  tensor."""


# ---- config --------------------------------------------------------------------
def _set(c: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *parents, leaf = key.split('.')
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value


def structure(d: dict[str, Any], where: str) -> dict[str, Any]:
  """Our config keys (flat, 'model.strides') describing the DAC config.json
  `d`: its numbers and FIXED_MODEL.

  Raises:
    ConfigError: naming a key we do not know or cannot build, or derived
      numbers that contradict the others.
  """
  unknown = sorted(set(d) - set(NUMBERS) - set(TRAINING) - set(DERIVED_KEYS)
                   - set(BOOKKEEPING))
  if unknown:
    raise ConfigError(f'{where}: keys our DAC import does not know: '
                      f'{", ".join(unknown)} (a newer or modified DAC; they '
                      'may change the network, so nothing was imported)')
  missing = sorted(set(NUMBERS) - set(d))
  if missing:
    raise ConfigError(f'{where}: no {", ".join(missing)} (not a DAC config)')
  out = dict(FIXED_MODEL)
  for theirs, ours in NUMBERS.items():
    value = d[theirs]
    out[ours] = tuple(int(v) for v in value) if ours == 'model.strides' else (
        int(value))
  strides = out['model.strides']
  latent = out['model.encoder_dim'] * 2 ** len(strides)
  out['model.latent_dim'] = latent
  want = {'hidden_size': latent, 'hop_length': math.prod(strides),
          'upsampling_ratios': list(strides[::-1])}
  for key, value in want.items():
    if key in d and (list(d[key]) if isinstance(d[key], (list, tuple))
                     else d[key]) != value:
      raise ConfigError(f'{where}: {key} is {d[key]!r}, but DAC derives '
                        f'{value!r} from the other keys (our import supports '
                        'only that)')
  return out


def _training(d: dict[str, Any]) -> dict[str, Any]:
  return {ours: float(d[theirs]) for theirs, ours in TRAINING.items()
          if theirs in d}


def run_config(d: dict[str, Any], where: str,
               config: ml_collections.ConfigDict | None = None
               ) -> ml_collections.ConfigDict:
  """Our codec config for DAC config.json `d`.

  Args:
    d: the config.json.
    where: its path, for errors.
    config: our codec config of the model (e.g. configs/codec/dac_44khz.py):
      its structure must be the folder's; its training settings apply. None:
      the codec defaults with the folder's numbers, RUN_DEFAULTS and DAC's
      training settings.

  Raises:
    ConfigError: naming the key.
  """
  flat = structure(d, where)
  if config is not None:
    if config.task != 'codec':
      raise ConfigError(f'--config is a config for '
                        f'{config_lib.run_kind(config.task)}; DAC is a codec: '
                        'pass a codec config (configs/codec/dac_44khz.py)')
    M.check_same(where, flat, config_lib.flatten(config), ConfigError)
    return config
  c = config_lib.for_task('codec')
  for key, value in {**flat, **RUN_DEFAULTS, **_training(d)}.items():
    _set(c, key, value)
  hop, sr = math.prod(c.model.strides), c.data.sample_rate
  c.data.segment_seconds = max(1, round(SEGMENT_SECONDS * sr / hop)) * hop / sr
  config_lib.validate(c, config_lib.schema_for(c))
  return c


def read_config(source: str, config: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """`run_config` of a folder's config.json (model_type must be 'dac'), or
  of a descript .pth file's metadata (`is_descript`)."""
  if is_descript(source):
    d = descript_config(_descript_file(source)['metadata'], source)
    return run_config(d, source, config)
  d, path = M.read_config_json(source, DacWeightsError, 'DAC', MODEL_TYPE)
  return run_config(d, path, config)


# ---- weight-normalised layouts -> plain weights -----------------------------------
_WN_PAIRS = (('.weight_g', '.weight_v'),
             ('.parametrizations.weight.original0',
              '.parametrizations.weight.original1'))


class WeightNormFolded:
  """A reader (reader.Reader's interface) whose torch weight-norm pairs read
  as the plain `weight` they parametrise: g * v / |v|, the norm over all but
  axis 0 (torch's default dim=0, also for ConvTranspose1d's [in, out, k])."""

  def __init__(self, reader):
    self.reader, self.error = reader, reader.error
    self.pairs = {}   # plain name -> (g name, v name)
    for name in reader.names:
      for g_sfx, v_sfx in _WN_PAIRS:
        if name.endswith(v_sfx):
          base = name[:-len(v_sfx)]
          self.pairs[base + '.weight'] = (base + g_sfx, name)
    used = {n for pair in self.pairs.values() for n in pair}
    self.names = sorted((set(reader.names) - used) | set(self.pairs))

  def path(self, name: str) -> str:
    return self.reader.path(self.pairs.get(name, (name, name))[1])

  def shape(self, name: str) -> tuple[int, ...]:
    return self.reader.shape(self.pairs[name][1] if name in self.pairs
                             else name)

  def dtype(self, name: str) -> str:
    return self.reader.dtype(self.pairs[name][1] if name in self.pairs
                             else name)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: self.shape(name) for name in self.names}

  def get(self, name: str) -> np.ndarray:
    if name not in self.pairs:
      return self.reader.get(name)
    g_name, v_name = self.pairs[name]
    v = self.reader.get(v_name).astype(np.float64)
    g = self.reader.get(g_name).astype(np.float64)
    if g.size != v.shape[0]:
      raise self.error(f'{self.reader.path(g_name)}: tensor {g_name!r} has '
                       f'shape {g.shape}, the weight norm of {v_name!r} '
                       f'{v.shape} needs {v.shape[0]} values')
    norm = np.sqrt(np.sum(np.square(v), axis=tuple(range(1, v.ndim)),
                          keepdims=True))
    return (g.reshape(norm.shape) * v / norm).astype(np.float32)


# ---- DAC's layout -> ours --------------------------------------------------------
# Snake1d.alpha [1, C, 1] -> [C].
ALPHA = M.Rule(lambda w: w.reshape(-1), lambda s: (1, s[0], 1))
# A 1x1 conv of the quantizer [out, in, 1] -> a dense [in, out].
DENSE = M.Rule(lambda w: w[:, :, 0].T, lambda s: (s[1], s[0], 1))


def transposed_rule(m: int) -> M.Rule:
  """ConvTranspose1d [in, out, m * stride] -> our polyphase [m, in, stride,
  out]: tap j holds kernel positions (m - 1 - j) * stride + r."""
  return M.Rule(
      lambda w: w.reshape(w.shape[0], w.shape[1], m, -1)[:, :, ::-1]
      .transpose(2, 0, 3, 1),
      lambda s: (s[1], s[3], m * s[2]))


def names(c: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
  """Our module path -> (DAC module name, kind: conv | up | snake), for
  every conv and Snake of the codec `c` describes."""
  m = c.model
  out = {}

  def unit(ours, theirs):
    for u in range(len(m.dilations)):
      out[f'{ours}/units/{u}/act1'] = (f'{theirs}.res_unit{u + 1}.snake1', 'snake')
      out[f'{ours}/units/{u}/conv1'] = (f'{theirs}.res_unit{u + 1}.conv1', 'conv')
      out[f'{ours}/units/{u}/act2'] = (f'{theirs}.res_unit{u + 1}.snake2', 'snake')
      out[f'{ours}/units/{u}/conv2'] = (f'{theirs}.res_unit{u + 1}.conv2', 'conv')

  n = len(m.strides)
  out['encoder/stem'] = ('encoder.conv1', 'conv')
  for i in range(n):
    unit(f'encoder/blocks/{i}', f'encoder.block.{i}')
    out[f'encoder/blocks/{i}/act'] = (f'encoder.block.{i}.snake1', 'snake')
    out[f'encoder/blocks/{i}/down'] = (f'encoder.block.{i}.conv1', 'conv')
  out['encoder/act'] = ('encoder.snake1', 'snake')
  out['encoder/proj'] = ('encoder.conv2', 'conv')
  out['decoder/stem'] = ('decoder.conv1', 'conv')
  for i in range(n):
    out[f'decoder/blocks/{i}/act'] = (f'decoder.block.{i}.snake1', 'snake')
    out[f'decoder/blocks/{i}/up'] = (f'decoder.block.{i}.conv_t1', 'up')
    unit(f'decoder/blocks/{i}', f'decoder.block.{i}')
  out['decoder/act'] = ('decoder.snake1', 'snake')
  out['decoder/out'] = ('decoder.conv2', 'conv')
  return out


def quantizer_names(k: int) -> dict[str, tuple[list[str], M.Rule]]:
  """Our quantizer's stacked arrays -> DAC's tensor per codebook."""
  q = [f'quantizer.quantizers.{i}.' for i in range(k)]
  return {'quantizer/codebook': ([p + 'codebook.weight' for p in q], M.SAME),
          'quantizer/in_v': ([p + 'in_proj.weight' for p in q], DENSE),
          'quantizer/in_b': ([p + 'in_proj.bias' for p in q], M.SAME),
          'quantizer/out_v': ([p + 'out_proj.weight' for p in q], DENSE),
          'quantizer/out_b': ([p + 'out_proj.bias' for p in q], M.SAME)}


def _sources(c: ml_collections.ConfigDict) -> dict[str, M.Source]:
  up = transposed_rule(int(c.model.up_kernel_multiple))
  src = {}
  for ours, (theirs, kind) in names(c).items():
    if kind == 'snake':
      src[f'{ours}/alpha'] = M.one(f'{theirs}.alpha', ALPHA)
    else:
      src[f'{ours}/v'] = M.one(f'{theirs}.weight', up if kind == 'up' else M.CONV)
      src[f'{ours}/bias'] = M.one(f'{theirs}.bias', M.SAME)
  for ours, (theirs, rule) in quantizer_names(int(c.model.rvq.num_codebooks)).items():
    src[ours] = M.Source(theirs, rule, stacked=True)
  return src


def _mapping(c: ml_collections.ConfigDict) -> M.Mapping:
  return M.Mapping(_sources(c), DacWeightsError, model='our DAC codec',
                   missing_hint='; a DAC of another size or version?',
                   extra_hint='a checkpoint of another model or DAC version?')


def make(c: ml_collections.ConfigDict) -> Callable[[], CodecModel]:
  return lambda: CodecModel(c.model, c.data.sample_rate, c.data.channels,
                            rngs=nnx.Rngs(0))


# Our arrays DAC has no tensor for: the weight norms' g (from v) and the
# quantizer's statistics.
_DERIVED = re.compile(r'.*/g|quantizer/(in_g|out_g|cluster_size|embed_sum|'
                      r'initialized)')


def _is_derived(path, _) -> bool:
  return bool(_DERIVED.fullmatch(M.path_key(path)))


def norm(v: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
  """sqrt(|v|^2 + eps) over `axes`, in float64 (the g of weight v)."""
  return np.sqrt(np.sum(np.square(v.astype(np.float64)), axis=axes) + eps)


def derived(c: ml_collections.ConfigDict, mapped: dict[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
  """Our derived arrays (by path) from the mapped ones (by path, on host)."""
  eps = float(c.model.rvq.norm_eps)
  out = {}
  for key, v in mapped.items():
    if key.endswith('/v'):   # a conv: its norm over all but the output axis
      out[key[:-1] + 'g'] = norm(v, tuple(range(v.ndim - 1)), CONV_NORM_EPS)
  for side in ('in', 'out'):   # [K, in, out]: per codebook and output
    out[f'quantizer/{side}_g'] = norm(mapped[f'quantizer/{side}_v'], (1,), eps)
  cb = mapped['quantizer/codebook']
  # As a fresh run without k-means: unit mass per code, EMA sums = codes.
  out['quantizer/cluster_size'] = np.ones(cb.shape[:2])
  out['quantizer/embed_sum'] = cb
  out['quantizer/initialized'] = np.asarray(True)
  return out


def _flat(pure: dict) -> dict[str, Any]:
  return {M.path_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(pure)}


def read_arrays(reader, c: ml_collections.ConfigDict, state,
                place: Callable[[str, np.ndarray], Any]) -> dict:
  """The pure dict of `state` (our codec's abstract state under `c`) from the
  reader's tensors: each mapped array is handed to `place(path, value)` as it
  is read (mapping.load_arrays), then the derived ones.

  Raises:
    DacWeightsError: naming the file and the tensor.
  """
  derived_state, mapped_state = nnx.split_state(state, _is_derived, ...)
  host = {}   # what `derived` reads: the weights and the codebooks

  def keep(key, value):
    if key.endswith('v') or key == 'quantizer/codebook':
      host[key] = value
    return place(key, value)

  values = _flat(M.load_arrays(_mapping(c), mapped_state, reader, keep))
  want = _flat(nnx.to_pure_dict(derived_state))
  for key, value in derived(c, host).items():
    values[key] = place(key, np.asarray(value, want[key].dtype))
  return jax.tree_util.tree_map_with_path(
      lambda path, _: values[M.path_key(path)], nnx.to_pure_dict(state))


def open_weights(source: str):
  """The tensors of a DAC folder or descript .pth file, weight-norm pairs
  folded (WeightNormFolded), by transformers' names."""
  if is_descript(source):
    return WeightNormFolded(DescriptReader(source))
  return WeightNormFolded(reader_lib.Reader(source, DacWeightsError,
                                            'a DAC checkpoint folder'))


# ---- descript's own files (dac.utils.download: weights_44khz_8kbps_*.pth) ----------
# A torch.save of {'state_dict': ..., 'metadata': {'kwargs': DAC(...)'s
# arguments}}, read with torch.load(weights_only=True): tensors, numbers and
# lists only, nothing unpickled that could run code. Its modules are
# nn.Sequential, so its names are indices; they are renamed to transformers'
# (whose converter does the same), and errors name those.
PTH = '.pth'
# descript's DAC(...) arguments -> DacConfig's keys.
DESCRIPT_KWARGS = {'encoder_dim': 'encoder_hidden_size',
                   'encoder_rates': 'downsampling_ratios',
                   'decoder_dim': 'decoder_hidden_size',
                   'n_codebooks': 'n_codebooks', 'codebook_size': 'codebook_size',
                   'codebook_dim': 'codebook_dim',
                   'quantizer_dropout': 'quantizer_dropout',
                   'sample_rate': 'sampling_rate'}
# A ResidualUnit's Sequential: Snake1d, conv (k 7), Snake1d, conv (k 1).
_UNIT = ('snake1', 'conv1', 'snake2', 'conv2')


def is_descript(source: str) -> bool:
  return source.endswith(PTH) and os.path.isfile(source)


def _descript_file(path: str) -> dict[str, Any]:
  try:
    import torch
  except ImportError:
    raise DacWeightsError(f'{path}: reading descript\'s .pth files needs '
                          'torch (pip install torch)') from None
  try:
    d = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as err:  # torch raises many types for a bad file
    raise DacWeightsError(f'{path}: not a descript DAC file torch.load('
                          f'weights_only=True) reads ({type(err).__name__}: '
                          f'{str(err)[:200]}); it may be truncated: download '
                          'it again') from None
  if not (isinstance(d, dict) and isinstance(d.get('state_dict'), dict)
          and isinstance(d.get('metadata', {}).get('kwargs'), dict)):
    raise DacWeightsError(f"{path}: no 'state_dict' and 'metadata' "
                          "{'kwargs'} (not a descript DAC file)")
  return d


def descript_config(metadata: dict[str, Any], where: str) -> dict[str, Any]:
  """DacConfig's keys for descript's metadata['kwargs'].

  Raises:
    ConfigError: an argument we cannot build (named).
  """
  kw = dict(metadata['kwargs'])
  unknown = sorted(set(kw) - set(DESCRIPT_KWARGS) - {'latent_dim',
                                                     'decoder_rates'})
  if unknown:
    raise ConfigError(f'{where}: DAC arguments our import does not know: '
                      f'{", ".join(unknown)}')
  d = {theirs: kw[ours] for ours, theirs in DESCRIPT_KWARGS.items() if ours in kw}
  rates = list(kw.get('encoder_rates', ()))
  if list(kw.get('decoder_rates', rates[::-1])) != rates[::-1]:
    raise ConfigError(f'{where}: decoder_rates {kw["decoder_rates"]} are not '
                      f'encoder_rates {rates} reversed (our codec needs that)')
  if kw.get('latent_dim') is not None:
    d['hidden_size'] = kw['latent_dim']   # checked by `structure`
  if not isinstance(d.get('codebook_dim', 0), int):
    raise ConfigError(f'{where}: codebook_dim {d["codebook_dim"]!r}: our '
                      'import needs one size for all codebooks')
  return d


def descript_name(name: str, n: int) -> str:
  """transformers' name of descript's tensor `name`, for a DAC of n blocks."""
  m = re.fullmatch(r'(encoder\.block|decoder\.model)\.(\d+)\.(.*)', name)
  if not m:
    return name   # quantizer.*: the same names
  side = 'encoder' if m[1] == 'encoder.block' else 'decoder'
  i, rest = int(m[2]), m[3]
  if i == 0:
    return f'{side}.conv1.{rest}'
  if i == n + 1:
    return f'{side}.snake1.{rest}'
  if i == n + 2:
    return f'{side}.conv2.{rest}'
  b = f'{side}.block.{i - 1}.'
  first_unit = 0 if side == 'encoder' else 2   # encoder: units, snake, conv
  u = re.fullmatch(r'block\.(\d+)\.block\.(\d+)\.(.*)', rest)
  units = len(FIXED_MODEL['model.dilations'])
  if u and 0 <= int(u[1]) - first_unit < units and int(u[2]) < len(_UNIT):
    return (f'{b}res_unit{int(u[1]) - first_unit + 1}.{_UNIT[int(u[2])]}.'
            f'{u[3]}')
  layer = {'encoder': {'3': 'snake1', '4': 'conv1'},
           'decoder': {'0': 'snake1', '1': 'conv_t1'}}[side]
  j = re.fullmatch(r'block\.(\d+)\.(.*)', rest)
  if j and j[1] in layer:
    return f'{b}{layer[j[1]]}.{j[2]}'
  return name   # reported as a tensor our model does not have


# torch dtypes -> safetensors' names (mapping.FLOAT_DTYPES).
_TORCH_DTYPES = {'torch.float32': 'F32', 'torch.float16': 'F16',
                 'torch.bfloat16': 'BF16', 'torch.float64': 'F64'}


class DescriptReader:
  """reader.Reader's interface over a descript .pth file's state dict, by
  transformers' names (`descript_name`)."""

  def __init__(self, path: str):
    self.file, self.error = path, DacWeightsError
    d = _descript_file(path)
    n = len(d['metadata']['kwargs'].get('encoder_rates', ()))
    self.tensors = {descript_name(k, n): v for k, v in d['state_dict'].items()}
    self.names = sorted(self.tensors)

  def path(self, name: str) -> str:
    return self.file

  def _tensor(self, name: str):
    if name not in self.tensors:
      raise self.error(f'{self.file}: tensor {name!r} is missing')
    return self.tensors[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensor(name).shape)

  def dtype(self, name: str) -> str:
    return _TORCH_DTYPES.get(str(self._tensor(name).dtype), 'other')

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: self.shape(name) for name in self.names}

  def get(self, name: str) -> np.ndarray:
    return self._tensor(name).float().numpy()


def check_layout(c: ml_collections.ConfigDict,
                 shapes: dict[str, tuple[int, ...]]) -> None:
  """Checks a checkpoint's plain tensor names and shapes (name -> shape)
  against the codec `c` describes, without any values.

  Raises:
    DacWeightsError: naming the tensor.
  """
  _, state = M.abstract_state(make(c))
  _, mapped_state = nnx.split_state(state, _is_derived, ...)
  M.check(_mapping(c), mapped_state, shapes, lambda name: '')


def load_reader(reader, c: ml_collections.ConfigDict) -> CodecModel:
  """Our codec `c` holding the reader's tensors, on the default device."""
  gdef, state = M.abstract_state(make(c))
  pure = read_arrays(reader, c, state, lambda key, v: jnp.asarray(v))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(gdef, state)


def load(folder: str, config: ml_collections.ConfigDict | None = None
         ) -> tuple[CodecModel, ml_collections.ConfigDict]:
  """Our codec holding a DAC folder's weights (float32), and its config.

  Args:
    folder: config.json and the safetensors weights (module doc).
    config: our codec config of the model; None: built from config.json
      (read_config).

  Raises:
    DacWeightsError / ConfigError: naming the file and tensor, or the key.
  """
  c = read_config(folder, config)
  return load_reader(open_weights(folder), c), c
