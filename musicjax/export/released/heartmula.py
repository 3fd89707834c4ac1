"""Loads a released HeartMuLa checkpoint folder (heartlib's layout) into our
AudioLM.

The folder is what heartlib's `HeartMuLa.save_pretrained` writes and
`from_pretrained` reads: config.json (model_type 'heartmula') and
model.safetensors, or shards model-0000i-of-0000n.safetensors listed in
model.safetensors.index.json (reader.py).

The model is described by our config (configs/lm/heartmula_oss_3b.py for the
released one, picked from the folder's backbone/decoder flavors); every
tensor of the folder maps onto exactly one of our arrays with its shape
checked against that config, and any missing, extra, misshapen or truncated
tensor is an error naming the file and the tensor (mapping.py).

heartlib's transformers are torchtune Llama 3.2 stacks whose token
embeddings and output layers are replaced by identities (they have no
weights), so the tensors are: the stacks' layers and final norms, the
shared audio table (codebook i's code t at row i * rows + t), the text
table, the unconditional row, the MuQ linear, the backbone-to-decoder
projection and the heads.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections
import numpy as np
from flax import nnx

from musicjax import config as config_lib
from musicjax.export.released import mapping as M
from musicjax.export.released import reader as reader_lib
from musicjax.lm import model as model_lib

SINGLE = reader_lib.SINGLE
INDEX = reader_lib.INDEX
CONFIG = M.CONFIG
MODEL_TYPE = 'heartmula'

# (backbone_flavor, decoder_flavor) of config.json -> our config of it.
FLAVORS = {('llama-3B', 'llama-300M'): 'lm/heartmula_oss_3b'}


class HeartMuLaWeightsError(reader_lib.WeightsError):
  """A HeartMuLa folder that cannot be loaded; the message names the file and
  the tensor (or the config key)."""


# ---- heartlib's layout -> ours ------------------------------------------------
# Our block's arrays -> a torchtune layer's tensors.
_LAYER = {'attn_norm/scale': 'sa_norm.scale',
          'mlp_norm/scale': 'mlp_norm.scale',
          'attn/wq': 'attn.q_proj.weight',
          'attn/wk': 'attn.k_proj.weight',
          'attn/wv': 'attn.v_proj.weight',
          'attn/wo': 'attn.output_proj.weight',
          'mlp/gate': 'mlp.w1.weight',
          'mlp/down': 'mlp.w2.weight',
          'mlp/up': 'mlp.w3.weight'}


def _stack_sources(ours: str, theirs: str, t: ml_collections.ConfigDict
                   ) -> dict[str, M.Source]:
  h, kv = int(t.num_heads), int(t.num_kv_heads)
  d = int(t.head_dim) or int(t.dim) // h
  rules = M.block_rules(h, kv, d, rotary=True)
  out = M.layers(f'{ours}/layers/', lambda i: f'{theirs}.layers.{i}.',
                 int(t.num_layers), _LAYER, rules)
  out[f'{ours}/norm/scale'] = M.one(f'{theirs}.norm.scale', M.SAME)
  return out


def _mapping(m: ml_collections.ConfigDict) -> M.Mapping:
  """Our state path -> the heartlib tensor(s) it is read from."""
  src = {
      'audio_embed': M.one('audio_embeddings.weight',
                           M.tables(int(m.num_codebooks))),
      'text_embed': M.one('text_embeddings.weight', M.SAME),
      'uncond_embed': M.one('unconditional_text_embedding.weight', M.ROW),
      'ref_proj': M.one('muq_linear.weight', M.LINEAR),
      'ref_bias': M.one('muq_linear.bias', M.SAME),
      'head0': M.one('codebook0_head.weight', M.LINEAR),
      'local_proj': M.one('projection.weight', M.LINEAR),
      'local_heads': M.one('audio_head', M.SAME),
  }
  src.update(_stack_sources('backbone', 'backbone', m.backbone))
  src.update(_stack_sources('local', 'decoder', m.local))
  return M.Mapping(
      src, HeartMuLaWeightsError,
      extra_hint='a checkpoint of another model, or a config of fewer layers?',
      unmapped=('HeartMuLa tensor (HeartMuLa has no melody table, a linear '
                'reference and an unconditional row: use '
                'configs/lm/heartmula_oss_3b.py or one of its structure)'))


def _make(m: ml_collections.ConfigDict):
  return lambda: model_lib.AudioLM(m, nnx.Rngs(0))


# ---- config --------------------------------------------------------------------
def config_name(folder: str) -> str:
  """The shipped config ('lm/heartmula_oss_3b') of the folder's
  (backbone_flavor, decoder_flavor) in its config.json."""
  d, path = M.read_config_json(folder, HeartMuLaWeightsError, 'HeartMuLa',
                               MODEL_TYPE)
  flavors = (d.get('backbone_flavor'), d.get('decoder_flavor'))
  if flavors not in FLAVORS:
    raise HeartMuLaWeightsError(
        f'{path}: no config of ours for backbone_flavor / decoder_flavor '
        f'{flavors} (known: {sorted(FLAVORS)}); pass one that describes it')
  return FLAVORS[flavors]


def read_config(folder: str, config: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """Our LM config for the folder: `config` if given, else the shipped one of
  its (backbone_flavor, decoder_flavor). config.json's numbers must be the
  config's."""
  d, path = M.read_config_json(folder, HeartMuLaWeightsError, 'HeartMuLa',
                               MODEL_TYPE)
  if config is None:
    config = config_lib.load(config_name(folder))
  m = config.model
  want = {'text_vocab_size': model_lib.text_rows(m),
          'audio_vocab_size': model_lib.audio_rows(m),
          'audio_num_codebooks': int(m.num_codebooks)}
  if m.reference == 'linear':
    want['muq_dim'] = int(m.reference_dim)
  M.check_same(path, {k: d[k] for k in want if k in d}, want,
               HeartMuLaWeightsError)
  return config


# ---- loading -------------------------------------------------------------------
def check_layout(config: ml_collections.ConfigDict,
                 shapes: dict[str, tuple[int, ...]]) -> None:
  """Checks a checkpoint's tensor names and shapes (name -> shape) against the
  model `config` describes, without any values.

  Raises:
    HeartMuLaWeightsError: naming the tensor.
  """
  M.check_layout(_mapping(config.model), _make(config.model), shapes)


def read_arrays(folder: str, config: ml_collections.ConfigDict, state,
                place: Callable[[str, np.ndarray], Any]) -> dict:
  """The folder's weights as the pure dict of `state` (our AudioLM's abstract
  state under `config`), streamed: each array is handed to
  `place(path, value)` as soon as it is read, and its result kept (e.g. the
  array on its sharding; see mapping.load_arrays).

  Raises:
    HeartMuLaWeightsError: naming the file and the tensor.
  """
  return M.load_arrays(_mapping(config.model), state, _reader(folder), place)


def _reader(folder: str) -> reader_lib.Reader:
  return reader_lib.Reader(folder, HeartMuLaWeightsError,
                           'a HeartMuLa checkpoint folder')


def load(folder: str, config: ml_collections.ConfigDict | None = None
         ) -> tuple[model_lib.AudioLM, ml_collections.ConfigDict]:
  """Our AudioLM holding a HeartMuLa checkpoint folder's weights (float32),
  and the config that describes it.

  Args:
    folder: holds config.json and the safetensors weights.
    config: our LM config of the model; by default the shipped one of the
      folder's flavors (see read_config).

  Raises:
    HeartMuLaWeightsError: naming the file and the tensor (or key).
  """
  config = read_config(folder, config)
  model = M.load(_mapping(config.model), _make(config.model), _reader(folder))
  return model, config
