"""Loads an EnCodec folder into our codec (musicjax/codec/model.py);
encodec_export.py writes one back.

The folder is what Hugging Face transformers' `EncodecModel.save_pretrained`
writes and `from_pretrained` reads (facebook/encodec_24khz, encodec_32khz,
the codec MusicGen uses): config.json (model_type 'encodec') and
model.safetensors, or shards listed in model.safetensors.index.json.

EnCodec is our codec with SEANet settings (`FIXED_MODEL`): ELU
activations, residual units with a compressed branch and an optional 1x1
conv skip, a 2-layer LSTM (plus skip) after the encoder blocks and the
decoder stem, EnCodec's padding (`pad_extra` 'seanet', reflect or zeros),
no tanh, and plain Euclidean codebooks in the latent space with EMA
statistics. Its convs are weight-normalised as ours, so torch's g and v
map one to one (`parametrizations.weight.original0/1`, or the older
`weight_g` / `weight_v`); the transposed convs keep torch's g per input
channel (`model.up_weight_norm` 'in').

Not supported, refused naming the config.json key: `norm_type`
'time_group_norm', `chunk_length_s` (overlap-added chunks), `normalize`
(the 48 kHz stereo model has all three), `trim_right_ratio` other than 1,
`last_kernel_size` other than `kernel_size`, a `codebook_dim` other than
`hidden_size`.
"""
from __future__ import annotations

import math
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
from musicjax.export.released import dac
from musicjax.export.released import mapping as M
from musicjax.export.released import reader as reader_lib

SINGLE = reader_lib.SINGLE
CONFIG = M.CONFIG
MODEL_TYPE = 'encodec'
ARCHITECTURE = 'EncodecModel'

# EnCodec's architecture in our config's terms: EncodecConfig has no keys for
# these (its strided convs have kernel 2 * ratio).
FIXED_MODEL = {
    'model.activation': 'elu',
    'model.pad_extra': 'seanet',
    'model.up_weight_norm': 'in',      # torch weight_norm of ConvTranspose1d
    'model.down_kernel_multiple': 2,
    'model.up_kernel_multiple': 2,
    'model.output_tanh': False,
    'model.output_highpass_hz': 0.0,
    'model.normalize': False,
    'model.rvq.factorized': False,
    'model.rvq.codebook_type': 'ema',
}
# EncodecConfig's values we cannot build -> why (the key is named).
REFUSED = {
    'norm_type': ('weight_norm', 'only weight-normalised convs are supported '
                  "('time_group_norm', as in encodec_48khz, is not)"),
    'chunk_length_s': (None, 'chunked encoding with overlap-add (encodec_48khz) '
                       'is not supported'),
    'normalize': (False, 'per-chunk input normalisation (encodec_48khz) is not '
                  'supported'),
    'trim_right_ratio': (1.0, 'only trimming all of a causal transposed conv\'s '
                         'padding on the right is supported'),
}
# torch's F.pad modes -> our conv pad_mode.
PAD_MODES = {'reflect': 'reflect', 'constant': 'zeros'}
# Keys that change nothing we build (overlap only matters with chunks) and
# PreTrainedConfig's bookkeeping.
IGNORED_KEYS = ('overlap',) + dac.BOOKKEEPING
KEYS = ('target_bandwidths', 'sampling_rate', 'audio_channels', 'hidden_size',
        'num_filters', 'num_residual_layers', 'upsampling_ratios', 'kernel_size',
        'last_kernel_size', 'residual_kernel_size', 'dilation_growth_rate',
        'use_causal_conv', 'pad_mode', 'compress', 'num_lstm_layers',
        'codebook_size', 'codebook_dim', 'use_conv_shortcut') + tuple(REFUSED)
# A run made without --config: its codebooks are trained (no k-means start),
# and no dead-code restarts: EnCodec's threshold (2 uses per batch, EMA) was
# for its batches of ~4800 frames; a fine-tuning batch of a few hundred
# frames would push most released codes under it and restart them.
RUN_DEFAULTS = {'model.rvq.kmeans_init': False,
                'model.rvq.dead_code_threshold': 0.0}


class EncodecWeightsError(reader_lib.WeightsError):
  """An EnCodec folder that cannot be loaded; the message names the file and
  the tensor."""


# ---- config --------------------------------------------------------------------
def frame_rate(d: dict[str, Any]) -> int:
  """EncodecConfig.frame_rate: ceil(sampling_rate / hop)."""
  return math.ceil(d['sampling_rate'] / math.prod(d['upsampling_ratios']))


def num_quantizers(d: dict[str, Any]) -> int:
  """EncodecConfig.num_quantizers: the codebooks of its largest bandwidth."""
  bits = math.ceil(math.log2(d['codebook_size']))
  return int(1000 * d['target_bandwidths'][-1] // (frame_rate(d) * bits))


def structure(d: dict[str, Any], where: str) -> dict[str, Any]:
  """Our config keys (flat, 'model.strides') describing the EnCodec
  config.json `d` (EncodecConfig's defaults fill keys it leaves out).

  Raises:
    ConfigError: naming a key we do not know or cannot build.
  """
  unknown = sorted(set(d) - set(KEYS) - set(IGNORED_KEYS))
  if unknown:
    raise ConfigError(f'{where}: keys our EnCodec import does not know: '
                      f'{", ".join(unknown)} (a newer or modified EnCodec; '
                      'they may change the network, so nothing was imported)')
  missing = sorted({'sampling_rate', 'upsampling_ratios', 'hidden_size',
                    'num_filters', 'codebook_size', 'target_bandwidths'} - set(d))
  if missing:
    raise ConfigError(f'{where}: no {", ".join(missing)} (not an EnCodec '
                      'config, or one saved without its numbers)')
  d = {'audio_channels': 1, 'num_residual_layers': 1, 'kernel_size': 7,
       'last_kernel_size': 7, 'residual_kernel_size': 3,
       'dilation_growth_rate': 2, 'use_causal_conv': True, 'pad_mode': 'reflect',
       'compress': 2, 'num_lstm_layers': 2, 'use_conv_shortcut': True,
       'codebook_dim': None, **{k: v for k, (v, _) in REFUSED.items()}, **d}
  for key, (ok, why) in REFUSED.items():
    if d[key] != ok:
      raise ConfigError(f'{where}: {key} is {d[key]!r}: {why}; our import '
                        f'needs {ok!r}')
  if d['last_kernel_size'] != d['kernel_size']:
    raise ConfigError(f'{where}: last_kernel_size {d["last_kernel_size"]} is '
                      f'not kernel_size {d["kernel_size"]} (our decoder\'s first '
                      'and last convs share model.stem_kernel)')
  if d['codebook_dim'] not in (None, d['hidden_size']):
    raise ConfigError(f'{where}: codebook_dim {d["codebook_dim"]} is not '
                      f'hidden_size {d["hidden_size"]} (EnCodec has no '
                      'projection between them)')
  if d['pad_mode'] not in PAD_MODES:
    raise ConfigError(f'{where}: pad_mode {d["pad_mode"]!r}: our import '
                      f'supports {", ".join(map(repr, PAD_MODES))}')
  if int(d['num_lstm_layers']) < 1:
    raise ConfigError(f'{where}: num_lstm_layers {d["num_lstm_layers"]}: '
                      'EnCodec always has its LSTM (at least 1 layer)')
  k = num_quantizers(d)
  if k < 1:
    raise ConfigError(f'{where}: target_bandwidths {d["target_bandwidths"]} '
                      'give no codebook at this frame rate and codebook_size')
  ratios = tuple(int(r) for r in d['upsampling_ratios'])
  growth, layers = int(d['dilation_growth_rate']), int(d['num_residual_layers'])
  filters = int(d['num_filters'])
  out = dict(FIXED_MODEL)
  out.update({
      'data.sample_rate': int(d['sampling_rate']),
      'data.channels': int(d['audio_channels']),
      'model.encoder_dim': filters,
      'model.decoder_dim': filters * 2 ** len(ratios),
      'model.latent_dim': int(d['hidden_size']),
      'model.strides': ratios[::-1],    # theirs are the decoder's order
      'model.dilations': tuple(growth ** j for j in range(layers)),
      'model.residual_kernel': int(d['residual_kernel_size']),
      'model.stem_kernel': int(d['kernel_size']),
      'model.latent_kernel': int(d['last_kernel_size']),
      'model.padding': 'causal' if d['use_causal_conv'] else 'same',
      'model.pad_mode': PAD_MODES[d['pad_mode']],
      'model.compress': int(d['compress']),
      'model.conv_shortcut': bool(d['use_conv_shortcut']),
      'model.lstm_layers': int(d['num_lstm_layers']),
      'model.rvq.num_codebooks': k,
      'model.rvq.codebook_size': int(d['codebook_size']),
      'model.rvq.codebook_dim': int(d['hidden_size']),
  })
  return out


def run_config(d: dict[str, Any], where: str,
               config: ml_collections.ConfigDict | None = None
               ) -> ml_collections.ConfigDict:
  """Our codec config for EnCodec config.json `d`: `config` (its structure
  must be the folder's), or the codec defaults with the folder's numbers and
  RUN_DEFAULTS.

  Raises:
    ConfigError: naming the key.
  """
  flat = structure(d, where)
  if config is not None:
    if config.task != 'codec':
      raise ConfigError(f'--config is a config for '
                        f'{config_lib.run_kind(config.task)}; EnCodec is a '
                        'codec: pass a codec config (configs/codec/'
                        'encodec_32khz.py)')
    M.check_same(where, flat, config_lib.flatten(config), ConfigError)
    return config
  c = config_lib.for_task('codec')
  for key, value in {**flat, **RUN_DEFAULTS}.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  # Whole frames of about the default segment length.
  hop, sr = math.prod(c.model.strides), c.data.sample_rate
  c.data.segment_seconds = max(1, round(c.data.segment_seconds * sr / hop)
                               ) * hop / sr
  config_lib.validate(c, config_lib.schema_for(c))
  return c


def read_json(folder: str) -> tuple[dict[str, Any], str]:
  return M.read_config_json(folder, EncodecWeightsError, 'EnCodec', MODEL_TYPE)


def read_config(folder: str, config: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """`run_config` of a folder's config.json (model_type must be 'encodec')."""
  d, path = read_json(folder)
  return run_config(d, path, config)


def record(folder: str) -> dict[str, Any]:
  """What RUN/released/encodec.json keeps beside the folder's path: its
  target_bandwidths, which export-encodec writes back."""
  d, _ = read_json(folder)
  return {'target_bandwidths': [float(b) for b in d['target_bandwidths']]}


# ---- tensor names ------------------------------------------------------------------
# torch weight-norm names, new (parametrizations) and old (weight_g / _v).
G, V = 'parametrizations.weight.original0', 'parametrizations.weight.original1'
_OLD = {'weight_g': G, 'weight_v': V}


class Renamed:
  """A reader (reader.Reader's interface) whose old-style `weight_g` /
  `weight_v` read under the parametrizations names transformers writes now
  (its from_pretrained renames them the same way)."""

  def __init__(self, reader):
    self.reader, self.error = reader, reader.error
    self.theirs = {}
    for name in reader.names:
      base, _, leaf = name.rpartition('.')
      new = f'{base}.{_OLD[leaf]}' if leaf in _OLD else name
      if new in self.theirs:
        raise self.error(f'{reader.path(name)}: tensors {name!r} and '
                         f'{self.theirs[new]!r} are the same weight (saved '
                         'twice, in both weight-norm layouts)')
      self.theirs[new] = name
    self.names = sorted(self.theirs)

  def _name(self, name: str) -> str:
    return self.theirs.get(name, name)

  def path(self, name: str) -> str:
    return self.reader.path(self._name(name))

  def shape(self, name: str) -> tuple[int, ...]:
    return self.reader.shape(self._name(name))

  def dtype(self, name: str) -> str:
    return self.reader.dtype(self._name(name))

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: self.shape(name) for name in self.names}

  def get(self, name: str) -> np.ndarray:
    return self.reader.get(self._name(name))


def names(c: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
  """Our module path -> (EnCodec module name, kind: conv | up | lstm) for
  every conv and LSTM of the codec `c` describes. EnCodec's modules are one
  list per side: ELUs take indices too (so they are skipped here)."""
  m = c.model
  n, r = len(m.strides), len(m.dilations)
  out = {}

  def unit(ours, theirs):
    out[f'{ours}/conv1'] = (f'{theirs}.block.1.conv', 'conv')
    out[f'{ours}/conv2'] = (f'{theirs}.block.3.conv', 'conv')
    if m.conv_shortcut:
      out[f'{ours}/shortcut'] = (f'{theirs}.shortcut.conv', 'conv')

  out['encoder/stem'] = ('encoder.layers.0.conv', 'conv')
  for i in range(n):   # units, ELU, strided conv
    base = 1 + i * (r + 2)
    for j in range(r):
      unit(f'encoder/blocks/{i}/units/{j}', f'encoder.layers.{base + j}')
    out[f'encoder/blocks/{i}/down'] = (f'encoder.layers.{base + r + 1}.conv',
                                       'conv')
  end = 1 + n * (r + 2)   # LSTM, ELU, conv
  out['encoder/lstm/lstm'] = (f'encoder.layers.{end}.lstm', 'lstm')
  out['encoder/proj'] = (f'encoder.layers.{end + 2}.conv', 'conv')
  out['decoder/stem'] = ('decoder.layers.0.conv', 'conv')
  out['decoder/lstm/lstm'] = ('decoder.layers.1.lstm', 'lstm')
  for i in range(n):   # ELU, transposed conv, units
    base = 2 + i * (r + 2)
    out[f'decoder/blocks/{i}/up'] = (f'decoder.layers.{base + 1}.conv', 'up')
    for j in range(r):
      unit(f'decoder/blocks/{i}/units/{j}', f'decoder.layers.{base + 2 + j}')
  out['decoder/out'] = (f'decoder.layers.{2 + n * (r + 2) + 1}.conv', 'conv')
  return out


# Our LSTM's arrays -> torch's per-layer tensors and their rules.
LSTM_NAMES = {'w_ih': ('weight_ih_l', M.LINEAR), 'w_hh': ('weight_hh_l', M.LINEAR),
              'b_ih': ('bias_ih_l', M.SAME), 'b_hh': ('bias_hh_l', M.SAME)}
# Our quantizer's stacked arrays -> each codebook's buffer.
CODEBOOK_NAMES = {'codebook': 'embed', 'cluster_size': 'cluster_size',
                  'embed_sum': 'embed_avg'}


def codebook_prefix(k: int) -> str:
  return f'quantizer.layers.{k}.codebook.'


def _sources(c: ml_collections.ConfigDict) -> dict[str, M.Source]:
  up = dac.transposed_rule(int(c.model.up_kernel_multiple))
  src = {}
  for ours, (theirs, kind) in names(c).items():
    if kind == 'lstm':
      for leaf, (name, rule) in LSTM_NAMES.items():
        src[f'{ours}/{leaf}'] = M.Source(
            [f'{theirs}.{name}{i}' for i in range(int(c.model.lstm_layers))],
            rule, stacked=True)
      continue
    src[f'{ours}/v'] = M.one(f'{theirs}.{V}', up if kind == 'up' else M.CONV)
    src[f'{ours}/g'] = M.one(f'{theirs}.{G}', M.WN_G)
    src[f'{ours}/bias'] = M.one(f'{theirs}.bias', M.SAME)
  k = int(c.model.rvq.num_codebooks)
  for ours, theirs in CODEBOOK_NAMES.items():
    src[f'quantizer/{ours}'] = M.Source(
        [codebook_prefix(i) + theirs for i in range(k)], M.SAME, stacked=True)
  return src


def _inited(k: int) -> list[str]:
  return [codebook_prefix(i) + 'inited' for i in range(k)]


def _mapping(c: ml_collections.ConfigDict) -> M.Mapping:
  # Each codebook's `inited` flag is read by read_arrays (into our one
  # `initialized`), not by the engine.
  inited = tuple(re.escape(n) for n in _inited(int(c.model.rvq.num_codebooks)))
  return M.Mapping(_sources(c), EncodecWeightsError, ignored=inited,
                   model='our EnCodec codec',
                   missing_hint='; an EnCodec of another size or version?',
                   extra_hint='a checkpoint of another model or EnCodec '
                   'version?')


def make(c: ml_collections.ConfigDict) -> Callable[[], CodecModel]:
  return lambda: CodecModel(c.model, c.data.sample_rate, c.data.channels,
                            rngs=nnx.Rngs(0))


def _is_derived(path, _) -> bool:
  return M.path_key(path) == 'quantizer/initialized'


def initialized(reader, k: int) -> bool:
  """Our one `initialized` flag from EnCodec's per-codebook `inited`
  buffers (all 1: trained codebooks; all 0: untrained ones)."""
  flags = []
  for name in _inited(k):
    if name not in reader.names:
      raise EncodecWeightsError(f'{reader.path(name)}: tensor {name!r} is '
                                'missing (needed for quantizer/initialized)')
    if tuple(reader.shape(name)) != (1,):
      raise EncodecWeightsError(f'{reader.path(name)}: tensor {name!r} has '
                                f'shape {tuple(reader.shape(name))}, not (1,)')
    flags.append(bool(reader.get(name)[0] != 0))
  if len(set(flags)) > 1:
    raise EncodecWeightsError(
        f'{reader.path(_inited(k)[0])}: codebooks '
        f'{[i for i, f in enumerate(flags) if not f]} are not inited while '
        'others are (our codec keeps one flag for all codebooks)')
  return flags[0]


def read_arrays(reader, c: ml_collections.ConfigDict, state,
                place: Callable[[str, np.ndarray], Any]) -> dict:
  """The pure dict of `state` (our codec's abstract state under `c`) from the
  reader's tensors, each handed to `place(path, value)` as it is read.

  Raises:
    EncodecWeightsError: naming the file and the tensor.
  """
  derived_state, mapped_state = nnx.split_state(state, _is_derived, ...)
  values = dict(_flat(M.load_arrays(_mapping(c), mapped_state, reader, place)))
  flag = initialized(reader, int(c.model.rvq.num_codebooks))
  want = _flat(nnx.to_pure_dict(derived_state))['quantizer/initialized']
  values['quantizer/initialized'] = place('quantizer/initialized',
                                          np.asarray(flag, want.dtype))
  return jax.tree_util.tree_map_with_path(
      lambda path, _: values[M.path_key(path)], nnx.to_pure_dict(state))


def _flat(pure: dict) -> dict[str, Any]:
  return {M.path_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(pure)}


def open_weights(folder: str) -> Renamed:
  """The tensors of an EnCodec folder, by the names transformers writes."""
  return Renamed(reader_lib.Reader(folder, EncodecWeightsError,
                                   'an EnCodec checkpoint folder'))


def check_layout(c: ml_collections.ConfigDict,
                 shapes: dict[str, tuple[int, ...]]) -> None:
  """Checks a checkpoint's tensor names and shapes (name -> shape) against
  the codec `c` describes, without any values (the `inited` flags aside).

  Raises:
    EncodecWeightsError: naming the tensor.
  """
  _, state = M.abstract_state(make(c))
  _, mapped_state = nnx.split_state(state, _is_derived, ...)
  M.check(_mapping(c), mapped_state, shapes, lambda name: '')


def load(folder: str, config: ml_collections.ConfigDict | None = None
         ) -> tuple[CodecModel, ml_collections.ConfigDict]:
  """Our codec holding an EnCodec folder's weights (float32), and its config.

  Raises:
    EncodecWeightsError / ConfigError: naming the file and tensor, or the key.
  """
  c = read_config(folder, config)
  gdef, state = M.abstract_state(make(c))
  pure = read_arrays(open_weights(folder), c, state,
                     lambda key, v: jnp.asarray(v))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(gdef, state), c
