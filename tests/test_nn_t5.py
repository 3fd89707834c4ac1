"""Our T5 encoder (nn/t5.py) on transformers' T5 weights gives transformers'
encoder states: a tiny random T5EncoderModel, saved as transformers saves
it, loaded with export/released/t5.py; ReLU (v1.0, MusicGen's t5-base) and
gated-GELU (v1.1) MLPs, with padding."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from musicjax.config import ConfigError
from musicjax.export.released import t5 as t5_import
from musicjax.nn import t5

transformers = pytest.importorskip('transformers')

# float32 on both sides, states of unit RMS (final layer norm): the gap is
# summation order (measured 1.5e-6 at most, both MLPs, 2026-12-07).
TOL = 2e-5


def _reference(tmp_path, mlp: str):
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
      relative_attention_num_buckets=16, relative_attention_max_distance=20,
      feed_forward_proj=mlp, dropout_rate=0.0)
  model = transformers.T5EncoderModel(config).eval()
  # Random init leaves the norms at 1: move them so a missed norm shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.uniform_(0.5, 1.5)
  folder = str(tmp_path / mlp)
  model.save_pretrained(folder)
  return model, folder


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 96, size=(2, 30))
  mask = np.ones((2, 30), np.int64)
  mask[1, 17:] = 0                      # the second row is padded
  return ids, mask


@pytest.mark.parametrize('mlp', ['relu', 'gated-gelu'])
def test_states_equal_transformers(tmp_path, mlp):
  model, folder = _reference(tmp_path, mlp)
  ids, mask = _inputs()
  with torch.no_grad():
    want = model(input_ids=torch.tensor(ids),
                 attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  ours = t5_import.load(folder)
  got = np.asarray(ours(ids, mask))
  err = np.abs(got - want)
  assert float(err[0].max()) < TOL, err[0].max()
  assert float(err[1, :17].max()) < TOL, err[1, :17].max()   # padded rows differ
  # The position bias matters: without it the states move far.
  ours.position_bias[...] = 0 * ours.position_bias[...]
  assert float(np.abs(np.asarray(ours(ids, mask))[0] - want[0]).max()) > 100 * TOL


def test_buckets_equal_transformers_beyond_max_distance():
  """Offsets up to +-300 (past max_distance 128): T5's own bucket function."""
  attention = transformers.models.t5.modeling_t5.T5Attention
  q, k = 300, 300
  offset = torch.arange(k)[None, :] - torch.arange(q)[:, None]
  want = attention._relative_position_bucket(
      offset, bidirectional=True, num_buckets=32, max_distance=128).numpy()
  np.testing.assert_array_equal(t5.relative_buckets(q, k, 32, 128), want)


def test_missing_tensor_and_wrong_model_are_named(tmp_path):
  _, folder = _reference(tmp_path, 'relu')
  path = os.path.join(folder, 'model.safetensors')
  tensors = load_file(path)
  name = 'encoder.block.1.layer.1.DenseReluDense.wi.weight'
  del tensors[name]
  save_file(tensors, path, metadata={'format': 'pt'})
  with pytest.raises(t5_import.T5WeightsError, match=name.replace('.', r'\.')):
    t5_import.load(folder)
  with open(os.path.join(folder, 'config.json')) as f:
    d = json.load(f)
  d['model_type'] = 'bert'
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(d, f)
  with pytest.raises(t5_import.T5WeightsError, match="model_type is 'bert'"):
    t5_import.load(folder)


def test_unsupported_mlp_is_refused():
  with pytest.raises(ConfigError, match="feed_forward_proj 'gated-silu'"):
    t5_import.config_from({'feed_forward_proj': 'gated-silu'})
