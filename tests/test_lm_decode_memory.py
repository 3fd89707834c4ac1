"""The decode loop's memory: the generate program, compiled from abstract
inputs as `musicjax bench heartmula-memory` compiles the 3B one, holds no
per-codebook copy of the audio embedding table (DecodeView reads the stacked
table in place).

The model is heartmula_tiny with the released table shape (8 codebooks of
8197 rows) at width 64: the table (16.8 MB) is then most of the weights.
Measured temps (jax 0.12.1): 4.1 MB, with per-codebook slices 20.9 MB (the
table plus the local heads' 3.7 MB of slices)."""
import pytest

from musicjax import config as cfg
from musicjax.bench import heartmula as bench

ROWS = 8197                 # the released 8192 codes + 5 special rows
WIDTH = 64
FRAMES = 8
PROMPT = (4, 4)             # tag and lyric tokens
F32 = 4


def _config(backbone_weights):
  c = cfg.load('lm/heartmula_tiny')
  m = c.model
  m.codebook_size, m.audio_vocab_size, m.end_id = 8192, ROWS, 8193
  m.backbone.dim = WIDTH
  c.sample.backbone_weights = backbone_weights
  c.sample.cfg_scale = 1.5                   # the released CFG batch of 2
  return c


@pytest.mark.parametrize('backbone_weights', ['fused', 'stacked'])
def test_generate_holds_no_copy_of_the_audio_table(backbone_weights):
  c = _config(backbone_weights)
  fig, _, _ = bench.lm_program(c, 'float32', FRAMES, PROMPT)
  m = c.model
  table = m.num_codebooks * ROWS * WIDTH * F32
  # The local heads are still sliced per codebook (a copy each).
  heads = (m.num_codebooks - 1) * m.local.dim * ROWS * F32
  temp = fig['temp_gib'] * bench.GIB
  # Copies of the table's K slices would alone exceed half of it; the rest
  # of the temps (caches, logits, fused blocks) is well under 1 MB here.
  assert temp < heads + table / 2, (temp, heads, table)
