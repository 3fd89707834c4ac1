"""An imported MusicGen and MusicGen-Melody fine-tune sharded like on one
device, on Auto and Explicit meshes (config.mesh.axis_type): the T5 text
encoder, the cross-attention and the chroma prefix all take the mesh.

Before, on an Explicit mesh the cross-attention's output contraction, the
T5 encoder's embedding gather, the chroma projection's bias and the
prefix's flags each stopped the step with a ShardingTypeError.
"""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from musicjax import cli
from musicjax.parallel import rules as rules_lib
from musicjax.train import runs
from musicjax.train import trainer

import test_accomp_train as AT
import test_import_musicgen as MG
import test_import_musicgen_melody as MM

pytest.importorskip('torch')
pytest.importorskip('transformers')

# Builder, and weights that must be split over the mesh (the melody model
# reads its text as a prefix: it has no cross-attention).
MODELS = {'musicgen': (MG.tiny_musicgen, ('text_encoder/wq', 'cross/wq')),
          'melody': (MM.tiny_melody, ('text_encoder/wq', 'chroma_proj'))}


@pytest.fixture(scope='module', params=sorted(MODELS))
def run(request, tmp_path_factory):
  root = tmp_path_factory.mktemp(request.param)
  folder = str(root / 'release')
  os.makedirs(folder)
  build, split = MODELS[request.param]
  build(folder)
  out = str(root / 'run')
  assert cli.main(['import-musicgen', '--from', folder, '--workdir', out]) == 0
  return out, split


def _config(run_split, data=1, fsdp=1, tensor=1, axis_type='auto'):
  c = runs.saved_config(run_split[0], 'lm')
  c.data.kind = 'synthetic'     # null melody for MusicGen-Melody
  c.data.markov_noise = (2,) * (c.model.num_codebooks - 1)
  c.data.batch_size = c.data.eval_batch_size = 4
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  c.mesh.axis_type = axis_type
  return c


def _steps(config, devices=None):
  """Three train steps (test_accomp_train's), then one eval batch: (losses,
  eval metrics, state, the state's shardings by path)."""
  s, state, losses = AT._three_steps(config, devices)
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    ev = next(iter(s.task.dataset('eval', 0, 1)))
    ev = trainer.global_batch(ev, s.task.batch_spec(config.data.batch_size),
                              s.eval_batch_shardings)
    metrics = trainer.make_eval_step(s)(state, ev, jax.random.key(0))
  pure = jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(state)))
  return (losses, {k: float(v) for k, v in metrics.items()}, pure,
          rules_lib.describe(s.state_shardings))


@pytest.fixture(scope='module')
def one_device(run):
  return _steps(_config(run), jax.devices()[:1])


@pytest.mark.parametrize('axis_type', ['auto', 'explicit'])
def test_fine_tuning_shards_like_one_device(run, one_device, axis_type):
  """data 2 x fsdp 2 x tensor 2: the batch, the weights' embed dim and
  their heads / MLP dims all split."""
  want_losses, want_eval, want, _ = one_device
  losses, got_eval, got, specs = _steps(_config(run, 2, 2, 2, axis_type))
  # The text encoder's, cross-attention's and chroma's weights really are
  # split.
  for part in run[1]:
    split = [v for k, v in specs.items() if k.startswith('model/') and part in k]
    assert len(split) == 1 and ("'fsdp'" in split[0] or "'tensor'" in split[0]
                                ), (part, specs)
  assert len(set(want_losses)) == 3               # three different batches
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  for k, v in want_eval.items():
    np.testing.assert_allclose(got_eval[k], v, rtol=2e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5), got, want)
