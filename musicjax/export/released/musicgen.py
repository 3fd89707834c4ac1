"""Loads a released MusicGen (transformers' `MusicgenForConditionalGeneration`
folder) into our single_stream AudioLM with its T5 text encoder.

The folder is what `save_pretrained` writes (e.g. a download of
facebook/musicgen-small): config.json (model_type 'musicgen', with the
sub-configs 'text_encoder' (T5), 'audio_encoder' (EnCodec) and 'decoder')
and model.safetensors (or shards and their index). The LM run takes the
decoder, the text encoder and the projection between them; the EnCodec
tensors ('audio_encoder.*') are the codec's (import_musicgen.py imports
them as a codec run beside the LM).

MusicGen's decoder is our transformer with its switches (LayerNorm with
bias, GELU MLP, sinusoidal input positions, cross-attention, no biases in
attention or the MLP), K code tables of codebook_size + 1 rows (the last
row is the pad id, which is also the start slot and every empty slot of the
delay pattern) and K heads over the codes only. Every tensor maps onto one
of our arrays with its shape checked; errors name the file and the tensor
(mapping.py).

MusicGen-Melody (`MusicgenMelodyForConditionalGeneration`, model_type
'musicgen_melody') is the same decoder without cross-attention: its config
sets our `conditioning` 'prefix' with num_chroma / chroma_length, and
'audio_enc_to_dec_proj' (the chroma projection) becomes `chroma_proj`
(model.py).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import ml_collections
import numpy as np
from flax import nnx

from musicjax import config as config_lib
from musicjax.config import ConfigError
from musicjax.export.released import mapping as M
from musicjax.export.released import reader as reader_lib
from musicjax.export.released import t5 as t5_lib
from musicjax.lm import model as model_lib

MODEL_TYPE = 'musicgen'
MELODY = 'musicgen_melody'
MODEL_TYPES = (MODEL_TYPE, MELODY)
SINGLE = reader_lib.SINGLE
CODEC_PREFIX = 'audio_encoder.'
_DECODER = 'decoder.model.decoder.'
# transformers' nn.LayerNorm default; MusicGen's config has no key for it.
LAYER_NORM_EPS = 1e-5


class MusicGenWeightsError(reader_lib.WeightsError):
  """A MusicGen folder that cannot be loaded; the message names the file and
  the tensor (or the config key)."""


# ---- config ----------------------------------------------------------------
def _need(d: dict[str, Any], key: str, path: str, where: str) -> Any:
  if key not in d:
    raise MusicGenWeightsError(f'{path}: {where} has no {key!r}')
  return d[key]


def config_from(d: dict[str, Any], path: str = 'config.json'
                ) -> ml_collections.ConfigDict:
  """Our LM config for a MusicGen or MusicGen-Melody config.json (dict)."""
  melody = d.get('model_type') == MELODY
  dec = _need(d, 'decoder', path, 'the config')
  text = _need(d, 'text_encoder', path, 'the config')
  get = lambda key: _need(dec, key, path, '"decoder"')
  v, k = int(get('vocab_size')), int(get('num_codebooks'))
  # What our layout builds in; anything else is another model.
  fixed = {'activation_function': 'gelu', 'scale_embedding': False,
           'audio_channels': 1, 'pad_token_id': v, 'bos_token_id': v}
  if not melody:
    fixed['cross_attention_hidden_size'] = None
  for key, want in fixed.items():
    if dec.get(key, want) != want:
      hint = (' (stereo MusicGen is not supported yet)'
              if key == 'audio_channels' else '')
      raise MusicGenWeightsError(
          f'{path}: decoder.{key} is {dec.get(key)!r}; we load MusicGen with '
          f'{key} = {want!r}{hint}')
  c = config_lib.for_task('lm')
  m = c.model
  m.variant, m.pattern = 'single_stream', 'delay'
  m.num_codebooks, m.codebook_size = k, v
  m.end_token = False
  m.text_vocab_size, m.text_extra_tokens = 0, False
  m.reference, m.melody = 'none', False
  m.max_seq_len = int(get('max_position_embeddings'))
  m.text_encoder = 't5'
  try:
    m.t5 = t5_lib.config_from(text, f'{path} "text_encoder"')
  except ConfigError as err:
    raise MusicGenWeightsError(str(err)) from None
  e = int(get('hidden_size'))
  m.context_proj = int(m.t5.dim) != e
  b = m.backbone
  b.num_layers = int(get('num_hidden_layers'))
  b.dim = e
  b.num_heads = b.num_kv_heads = int(get('num_attention_heads'))
  b.head_dim = 0
  b.mlp_dim = int(get('ffn_dim'))
  b.norm, b.mlp, b.positions = 'layer', 'gelu', 'sinusoidal'
  b.cross_attention = not melody
  b.norm_eps = LAYER_NORM_EPS
  b.dtype = 'float32'
  # The start slot is the only prompt slot; the data windows hold it.
  c.data.max_text_tokens = 1
  prefix = 0
  if melody:
    m.conditioning = 'prefix'
    for key, default in (('num_chroma', 12), ('chroma_length', 235)):
      value = d.get(key, default)   # transformers' defaults where absent
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MusicGenWeightsError(f'{path}: {key} must be a positive '
                                   f'integer, got {value!r}')
    m.chroma_bins = int(d.get('num_chroma', 12))
    m.chroma_length = int(d.get('chroma_length', 235))
    m.chroma_proj = m.chroma_bins != e
    # Training windows' prefix: the chroma and the padded description.
    prefix = m.chroma_length + int(c.data.max_context_tokens)
  c.data.max_frames = max(1, min(int(c.data.max_frames),
                                 m.max_seq_len - k - prefix))
  # MusicGen-Melody trains on the chroma of each window (prepare --chroma);
  # a melody id per frame (HeartMuLa-style table) exists in neither.
  c.cond.melody = melody
  c.loss.local_weighting = 'mean'   # MusicGen's objective: codebooks alike
  return c


# generation_config.json key -> config.sample key; transformers' defaults
# where the file (or a key) is absent, as its generate() would use them.
GENERATION = 'generation_config.json'
_SAMPLING = {'guidance_scale': ('cfg_scale', 1.0), 'top_k': ('top_k', 50),
             'top_p': ('top_p', 1.0), 'temperature': ('temperature', 1.0)}


def set_sampling(c: ml_collections.ConfigDict, folder: str) -> None:
  """config.sample from the folder's generation_config.json, as
  transformers' generate() samples (do_sample false: greedy)."""
  path = os.path.join(folder, GENERATION)
  d = {}
  if os.path.isfile(path):
    try:
      with open(path) as f:
        d = json.load(f)
    except ValueError as err:
      raise MusicGenWeightsError(f'{path}: not JSON ({err})') from None
  for theirs, (ours, default) in _SAMPLING.items():
    value = d.get(theirs)
    c.sample[ours] = type(c.sample[ours])(default if value is None else value)
  if not d.get('do_sample', False):
    c.sample.temperature = 0.0


def read_config(folder: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(our LM config, config.json as a dict) of a MusicGen folder, sampling
  as its generation_config.json says."""
  d, path = M.read_config_json(folder, MusicGenWeightsError, 'MusicGen', None)
  if d.get('model_type') not in MODEL_TYPES:
    raise MusicGenWeightsError(
        f'{path}: model_type is {d.get("model_type")!r}, not '
        f'{MODEL_TYPE!r} or {MELODY!r} (not a MusicGen checkpoint)')
  c = config_from(d, path)
  set_sampling(c, folder)
  return c, d


# ---- their layout -> ours ----------------------------------------------------
_LAYER = {'attn_norm/scale': 'self_attn_layer_norm.weight',
          'attn_norm/bias': 'self_attn_layer_norm.bias',
          'attn/wq': 'self_attn.q_proj.weight',
          'attn/wk': 'self_attn.k_proj.weight',
          'attn/wv': 'self_attn.v_proj.weight',
          'attn/wo': 'self_attn.out_proj.weight',
          'cross_norm/scale': 'encoder_attn_layer_norm.weight',
          'cross_norm/bias': 'encoder_attn_layer_norm.bias',
          'cross/wq': 'encoder_attn.q_proj.weight',
          'cross/wk': 'encoder_attn.k_proj.weight',
          'cross/wv': 'encoder_attn.v_proj.weight',
          'cross/wo': 'encoder_attn.out_proj.weight',
          'mlp_norm/scale': 'final_layer_norm.weight',
          'mlp_norm/bias': 'final_layer_norm.bias',
          'mlp/up': 'fc1.weight',
          'mlp/down': 'fc2.weight'}


def lm_mapping(m: ml_collections.ConfigDict,
               shapes: dict[str, tuple[int, ...]] | None = None) -> M.Mapping:
  """Our LM's state paths -> the folder's tensors; `shapes` picks the name
  the tied T5 embedding is stored under (default 'shared.weight')."""
  b = m.backbone
  h, k = int(b.num_heads), int(m.num_codebooks)
  d = int(b.dim) // h
  cross = m.get('conditioning', 'cross') == 'cross'
  names = {ours: theirs for ours, theirs in _LAYER.items()
           if cross or not ours.startswith('cross')}
  rules = {path: M.SAME for path in names if 'norm' in path}
  for part in ('attn', 'cross') if cross else ('attn',):
    rules.update({f'{part}/wq': M.heads_in(h, d), f'{part}/wk': M.heads_in(h, d),
                  f'{part}/wv': M.heads_in(h, d), f'{part}/wo': M.heads_out(h, d)})
  rules.update({'mlp/up': M.LINEAR, 'mlp/down': M.LINEAR})
  src = M.layers('backbone/layers/', lambda i: f'{_DECODER}layers.{i}.',
                 int(b.num_layers), names, rules)
  src['backbone/norm/scale'] = M.one(_DECODER + 'layer_norm.weight', M.SAME)
  src['backbone/norm/bias'] = M.one(_DECODER + 'layer_norm.bias', M.SAME)
  src['audio_embed'] = M.Source(
      [f'{_DECODER}embed_tokens.{i}.weight' for i in range(k)], M.SAME,
      stacked=True)
  src['heads'] = M.Source([f'decoder.lm_heads.{i}.weight' for i in range(k)],
                          M.LINEAR, stacked=True)
  if m.context_proj:
    src['context_proj'] = M.one('enc_to_dec_proj.weight', M.LINEAR)
    src['context_bias'] = M.one('enc_to_dec_proj.bias', M.SAME)
  if not cross and m.chroma_proj:
    src['chroma_proj'] = M.one('audio_enc_to_dec_proj.weight', M.LINEAR)
    src['chroma_bias'] = M.one('audio_enc_to_dec_proj.bias', M.SAME)
  text = t5_lib.mapping(m.t5, shapes or {}, prefix='text_encoder.')
  src.update({f'text_encoder/{path}': s for path, s in text.sources.items()})
  return M.Mapping(
      src, MusicGenWeightsError,
      ignored=text.ignored + (r'audio_encoder\..*',),
      model='MusicGen',
      extra_hint=('a checkpoint of another model, or a stereo / melody one?'
                  if cross else 'a checkpoint of another model, or a stereo '
                  'one?'),
      unmapped='MusicGen tensor (use the config read_config builds)')


def _make(m: ml_collections.ConfigDict):
  return lambda: model_lib.AudioLM(m, nnx.Rngs(0))


def reader(folder: str) -> reader_lib.Reader:
  return reader_lib.Reader(folder, MusicGenWeightsError,
                           'a MusicGen checkpoint folder')


def read_arrays(folder: str, config: ml_collections.ConfigDict, state,
                place: Callable[[str, np.ndarray], Any]) -> dict:
  """The folder's LM weights as the pure dict of `state` (our AudioLM's
  abstract state under `config`), each array handed to `place(path, value)`
  as soon as it is read (mapping.load_arrays)."""
  r = reader(folder)
  return M.load_arrays(lm_mapping(config.model, r.shapes()), state, r, place)


def load(folder: str) -> tuple[model_lib.AudioLM, ml_collections.ConfigDict]:
  """Our AudioLM holding a MusicGen folder's decoder, text encoder and
  projection (float32), and the config that describes it.

  Raises:
    MusicGenWeightsError: naming the file and the tensor (or key).
  """
  config, _ = read_config(folder)
  r = reader(folder)
  model = M.load(lm_mapping(config.model, r.shapes()), _make(config.model), r)
  return model, config
