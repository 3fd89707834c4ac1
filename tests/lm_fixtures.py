"""Small LM configs and sequences for tests (compiles in seconds)."""
from __future__ import annotations

import numpy as np
from flax import nnx

from musicjax.config import for_task
from musicjax.lm import layout


def small_config(variant: str = 'global_local', layout_name: str = 'prefix',
                 **data):
  c = for_task('lm')
  c.data.kind = 'synthetic'
  c.data.layout = layout_name
  c.data.max_frames = 16
  c.data.max_text_tokens = 8
  c.data.max_sections = 2
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  for k, v in data.items():
    c.data[k] = v
  m = c.model
  m.variant = variant
  m.num_codebooks = 3
  m.codebook_size = 16
  m.text_vocab_size = 12
  m.embed_init_std = 0.5
  for t in (m.backbone, m.local):
    t.dim = 32
    t.num_heads = 4
    t.num_kv_heads = 2
    t.mlp_dim = 64
    t.init_std = 0.1
  m.backbone.num_layers = 2
  m.local.num_layers = 2
  c.data.markov_noise = (2, 1)
  return c


def make_model(config, seed: int = 0):
  from musicjax.lm.model import AudioLM
  with nnx.use_eager_sharding(False):
    return AudioLM(config.model, nnx.Rngs(seed))


def text_ids(config, n: int, rng) -> list[int]:
  return [int(x) for x in rng.integers(0, config.model.text_vocab_size, n)]


def audio_id(config) -> int:
  return layout.extra_id(config.model.text_vocab_size, '<audio>')


def frames(config, n: int, rng) -> np.ndarray:
  return rng.integers(0, config.model.codebook_size,
                      (n, config.model.num_codebooks)).astype(np.int32)


def melody(n: int, rng) -> np.ndarray:
  return rng.integers(0, layout.MELODY_VOCAB - 1, n).astype(np.int32)
