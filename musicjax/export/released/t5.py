"""Loads a transformers T5 encoder checkpoint into musicjax/nn/t5.py.

A folder as transformers' `T5EncoderModel` (or `T5Model`) `save_pretrained`
writes it: config.json (model_type 't5') and safetensors. Inside a composite
checkpoint (MusicGen's text encoder) the same tensors sit under a prefix
('text_encoder.'), which `load_from` takes with the config's numbers.

Every encoder tensor maps onto one of our arrays, shapes checked; the
decoder side of a full T5Model is ignored, anything else is an error
naming the file and tensor (mapping.py).
"""
from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from musicjax.config import ConfigError
from musicjax.export.released import mapping as M
from musicjax.export.released import reader as reader_lib
from musicjax.nn import t5

MODEL_TYPE = 't5'
# config.json key -> ours (nn/t5.py).
_KEYS = {'vocab_size': 'vocab_size', 'd_model': 'dim', 'num_heads': 'num_heads',
         'd_kv': 'head_dim', 'd_ff': 'mlp_dim', 'num_layers': 'num_layers',
         'relative_attention_num_buckets': 'relative_buckets',
         'relative_attention_max_distance': 'relative_max_distance',
         'layer_norm_epsilon': 'norm_eps'}
# feed_forward_proj -> our mlp ('gated-gelu' runs gelu_new, the tanh form).
_MLPS = {'relu': 'relu', 'gated-gelu': 'gated-gelu'}
# The embedding is tied: a checkpoint holds it as shared.weight, and may
# repeat it under the encoder's name.
EMBED_NAMES = ('shared.weight', 'encoder.embed_tokens.weight')


class T5WeightsError(reader_lib.WeightsError):
  """A T5 checkpoint that cannot be loaded; the message names the file and
  the tensor."""


def config_from(d: dict[str, Any], where: str = 'config.json'
                ) -> ml_collections.ConfigDict:
  """Our T5 config for a transformers T5 config (dict)."""
  proj = d.get('feed_forward_proj', 'relu')
  if proj not in _MLPS:
    raise ConfigError(f'{where}: feed_forward_proj {proj!r} is not '
                      f'implemented (only {sorted(_MLPS)})')
  c = t5.default_config()
  for theirs, ours in _KEYS.items():
    if theirs in d:
      c[ours] = type(c[ours])(d[theirs])
  c.mlp = _MLPS[proj]
  try:
    t5.check_config(c)
  except ConfigError as err:
    raise ConfigError(f'{where}: {err}') from None
  return c


def _sources(c: ml_collections.ConfigDict, prefix: str, embed: str
             ) -> dict[str, M.Source]:
  h, d = int(c.num_heads), int(c.head_dim)
  block = lambda i: f'{prefix}encoder.block.{i}.layer.'
  names = {'attn_norm': '0.layer_norm.weight',
           'wq': '0.SelfAttention.q.weight', 'wk': '0.SelfAttention.k.weight',
           'wv': '0.SelfAttention.v.weight', 'wo': '0.SelfAttention.o.weight',
           'mlp_norm': '1.layer_norm.weight',
           'mlp_out': '1.DenseReluDense.wo.weight'}
  rules = {'attn_norm': M.SAME, 'mlp_norm': M.SAME, 'wq': M.heads_in(h, d),
           'wk': M.heads_in(h, d), 'wv': M.heads_in(h, d),
           'wo': M.heads_out(h, d), 'mlp_out': M.LINEAR, 'mlp_in': M.LINEAR,
           'mlp_gate': M.LINEAR}
  if c.mlp == 'gated-gelu':
    names.update(mlp_gate='1.DenseReluDense.wi_0.weight',
                 mlp_in='1.DenseReluDense.wi_1.weight')
  else:
    names['mlp_in'] = '1.DenseReluDense.wi.weight'
  m = M.layers('', block, int(c.num_layers), names, rules)
  m['embed'] = M.one(prefix + embed, M.SAME)
  m['position_bias'] = M.one(
      f'{prefix}encoder.block.0.layer.0.SelfAttention.relative_attention_bias'
      '.weight', M.SAME)
  m['final_norm'] = M.one(f'{prefix}encoder.final_layer_norm.weight', M.SAME)
  return m


def mapping(c: ml_collections.ConfigDict, shapes: dict[str, tuple[int, ...]],
            prefix: str = '', ignored: tuple[str, ...] = ()) -> M.Mapping:
  """The mapping for a checkpoint holding `shapes` (name -> shape): the
  embedding is read from whichever tied name it has."""
  embed = next((n for n in EMBED_NAMES if prefix + n in shapes), EMBED_NAMES[0])
  skip = [rf'{prefix}{n}'.replace('.', r'\.') for n in EMBED_NAMES
          if n != embed]
  return M.Mapping(
      _sources(c, prefix, embed), T5WeightsError,
      ignored=tuple(skip) + (rf'{prefix}decoder\..*', rf'{prefix}lm_head\..*')
      + tuple(ignored),
      model='the T5 encoder', extra_hint='a checkpoint of another model?')


def _make(c: ml_collections.ConfigDict):
  return lambda: t5.T5Encoder(c, rngs=nnx.Rngs(0))


def load_from(reader: reader_lib.Reader, c: ml_collections.ConfigDict,
              prefix: str = '', ignored: tuple[str, ...] = ()
              ) -> t5.T5Encoder:
  """The encoder `c` describes, from the tensors under `prefix`; tensors
  matching `ignored` (regexes) are other parts of a composite checkpoint."""
  return M.load(mapping(c, reader.shapes(), prefix, ignored), _make(c), reader)


def load(folder: str) -> t5.T5Encoder:
  """The encoder of a transformers T5 folder (config.json + safetensors)."""
  d, path = M.read_config_json(folder, T5WeightsError, 'T5', MODEL_TYPE)
  c = config_from(d, path)
  reader = reader_lib.Reader(folder, T5WeightsError, 'a T5 checkpoint folder')
  return load_from(reader, c)
