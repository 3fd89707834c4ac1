"""The codec's GAN step on 8 CPU devices: meshes (2,4) and (4,2), Auto and
Explicit axes, give the same numbers as one device."""
import jax
import numpy as np
import pytest

from musicjax import config as config_lib
from musicjax.parallel import rules as rules_lib
from musicjax.train import trainer
from tests import codec_fixtures as cf


def _config(data, fsdp, tensor, axis_type):
  c = cf.small_config()
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.loss.adv_start_step = 0  # exercise generator, discriminator and both optimizers
  c.loss.mel_windows, c.loss.mel_bins = (64,), (10,)  # smaller graph, same code paths
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  c.mesh.axis_type = axis_type
  return c


def _run(config, devices, steps=2):
  s = trainer.setup(config, devices)
  spec = s.task.batch_spec(config.data.batch_size)
  audio = cf.tone_mix(config.data.segment_seconds, config.data.sample_rate,
                      batch=config.data.batch_size)
  audio = audio * np.linspace(0.3, 1.0, audio.shape[0])[:, None, None]
  # Stereo: the second channel quieter and later, so the channels differ.
  audio = np.concatenate([np.roll(audio, 7 * i, axis=1) / (i + 1)
                          for i in range(config.data.channels)], axis=-1)
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    state = trainer.init_state(s)
    step_fn = trainer.make_train_step(s)
    out = []
    for i in range(1, steps + 1):
      batch = trainer.global_batch({'audio': audio.astype(np.float32)}, spec,
                                   s.batch_shardings)
      state, m, bad = step_fn(state, batch, np.int32(i))
      assert not bool(bad)
      out.append({k: float(v) for k, v in m.items()})
  return s, out


@pytest.fixture(scope='module')
def one_device():
  return _run(_config(1, 1, 1, 'auto'), jax.devices()[:1])[1]


# The toy task covers every mesh x axis-type pair (test_mesh.py); here the
# real GAN step on two of them, each compile costing ~20 s on 2 cores.
@pytest.mark.slow
@pytest.mark.parametrize('sizes,axis_type', [((2, 4, 1), 'explicit'),
                                             ((1, 4, 2), 'auto')])
def test_codec_step_sharded_matches_one_device(sizes, axis_type, one_device):
  s, got = _run(_config(*sizes, axis_type), None)
  # Conv weights really are split over fsdp (and tensor where it divides).
  specs = rules_lib.describe(s.state_shardings)
  assert any('fsdp' in v for k, v in specs.items() if k.startswith('generator')), specs
  for g, w in zip(got, one_device):
    for k in ('loss/total', 'loss/mel', 'loss/adv_d', 'loss/adv_g', 'loss/feat'):
      np.testing.assert_allclose(g[k], w[k], rtol=2e-4, atol=1e-5, err_msg=k)


# EnCodec's structure: an LSTM ends the encoder and starts the decoder. On an
# Explicit mesh its scan's zero state must carry the batch's sharding.
@pytest.mark.slow
def test_lstm_codec_step_on_an_explicit_mesh_matches_one_device():
  def config(*mesh):
    c = _config(*mesh)
    c.model.lstm_layers = 1
    c.loss.adv_start_step = 10**6     # the generator's path is the new part
    return c

  _, want = _run(config(1, 1, 1, 'auto'), jax.devices()[:1])
  _, got = _run(config(2, 4, 1, 'explicit'), None)
  for g, w in zip(got, want):
    for k in ('loss/total', 'loss/mel'):
      np.testing.assert_allclose(g[k], w[k], rtol=2e-4, atol=1e-5, err_msg=k)


# HeartCodec's trainable codec with its flow-matching decoder, stereo: the
# audio channels are folded into the batch (and back) around the encoder and
# the waveform decoder, and stay split like the batch on an Explicit mesh.
@pytest.mark.slow
def test_heartcodec_step_on_an_explicit_mesh_matches_one_device():
  def config(*mesh):
    c = config_lib.load('codec/heartcodec_train_tiny', [
        'config.data.channels=2', 'config.model.scalar.channels=2',
        'config.model.scalar.latent_dim=16',
        # A smaller graph with the same code paths: 2 upsampling blocks of
        # one residual unit each (15 x 16 = the tiny config's 5 x 4 x 4 x 3).
        'config.model.scalar.upsample_factors=(15,16)',
        'config.model.scalar.upsample_kernel_sizes=(30,32)',
        'config.model.scalar.res_dilations=(1,)',
        'config.model.estimator.num_layers=1'])
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh[:3]
    c.mesh.axis_type = mesh[3]
    return c

  _, want = _run(config(1, 1, 1, 'auto'), jax.devices()[:1])
  s, got = _run(config(2, 2, 2, 'explicit'), None)
  specs = rules_lib.describe(s.state_shardings)
  assert any('tensor' in v for k, v in specs.items() if 'estimator' in k), specs
  for g, w in zip(got, want):
    for k in ('loss/total', 'loss/flow', 'loss/mel', 'loss/wave'):
      np.testing.assert_allclose(g[k], w[k], rtol=2e-5, atol=1e-6, err_msg=k)
