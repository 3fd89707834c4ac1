"""Training HeartCodec (musicjax/codec/heartcodec/task.py, trainable.py):
shapes and gradient paths, then the tiny config trained on the chorales with
the generic trainer (its full-decode mel distance must drop), resumed, and
used to encode and detokenize audio."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicjax import config as config_lib
from musicjax.codec.heartcodec.scalar_decoder import round_to_levels
from musicjax.codec.heartcodec.task import HeartCodecTask
from musicjax.codec.heartcodec.trainable import TrainableHeartCodec
from musicjax.eval import audio_metrics
from musicjax.train import metrics as metrics_lib
from musicjax.train import runs
from musicjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'codec', 'heartcodec_train_tiny.py')
# Trained steps: the full-decode mel distance drops by at least MARGIN.
STEPS = 300
MARGIN = 0.15


def _config(overrides=()):
  return config_lib.load(TINY, list(overrides))


def _model(c):
  with nnx.use_eager_sharding(False):
    return TrainableHeartCodec(c.model, rngs=nnx.Rngs(0))


def _audio(c, batch=2, codes=8, seed=0):
  """Decaying harmonic tones [batch, codes x samples per code, channels]."""
  n = codes * 960
  t = np.arange(n) / c.data.sample_rate
  rng = np.random.default_rng(seed)
  x = sum(np.sin(2 * np.pi * f * t[None] * rng.uniform(0.9, 1.1, (batch, 1)))
          for f in (220.0, 330.0, 440.0)) * np.exp(-2 * t)[None]
  return (0.2 * x[..., None]).astype(np.float32)


def test_round_to_levels_value_and_straight_through_gradient():
  z = jnp.linspace(-1, 1, 101)
  assert np.array_equal(round_to_levels(z, 9.0), jnp.round(z * 9.0) / 9.0)
  g = jax.grad(lambda v: jnp.sum(3.0 * round_to_levels(v, 9.0)))(z)
  np.testing.assert_array_equal(g, 3.0)


def test_shapes_and_codes_decode_through_code_embedding():
  c = _config()
  m = _model(c)
  audio = jnp.asarray(_audio(c, codes=4))
  latent = m.latent(audio)
  assert latent.shape == (2, 8, 32)
  # Rounded to steps of 1/9 inside (-1, 1), as the waveform decoder reads it.
  np.testing.assert_allclose(latent * 9, jnp.round(latent * 9), atol=1e-5)
  assert float(jnp.max(jnp.abs(latent))) <= 1.0
  vectors, codes, aux = m.quantize(latent, jax.random.key(0), train=False)
  assert codes.shape == (2, 4, 4) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < 32
  assert vectors.shape == (2, 4, 8) and aux['perplexity'].shape == (4,)
  # One codebook variable: the VQ's codes are the ones CodeEmbedding reads.
  assert m.quantizer.codebook is m.decoder.codes.codebooks
  np.testing.assert_allclose(m.features(vectors), m.decoder.codes(codes),
                             rtol=1e-5, atol=1e-5)
  assert m.decoder.waveform(latent).shape == audio.shape
  np.testing.assert_array_equal(m.encode(np.asarray(audio)), codes)
  # Whole codes: audio is padded at the end.
  assert m.encode(np.asarray(audio)[:, :-100]).shape == (2, 4, 4)
  size = lambda mod: sum(x.size for x in jax.tree.leaves(nnx.state(mod, nnx.Param)))
  # The shared codebook is one parameter (the VQ has no other).
  assert size(m.quantizer) == 4 * 32 * 8
  assert size(m) == size(m.decoder) + size(m.encoder) + size(m.code_encoder)
  with pytest.raises(ValueError, match='audio must be'):
    m.encode(np.zeros((1, 960, 2), np.float32))


def _norm(tree) -> float:
  return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_each_loss_trains_its_own_parts():
  c = _config()
  task, m = HeartCodecTask(c), _model(c)
  audio = jnp.asarray(_audio(c, batch=1, codes=4))
  gdef, params, rest = nnx.split(m, nnx.Param, ...)
  lc = c.loss

  def parts(p):
    _, out = task._losses(nnx.merge(gdef, p, rest), audio, jax.random.key(1),
                          train=False)
    aux = out['aux']
    return jnp.stack([lc.mel_weight * out['mel'] + lc.wave_weight * out['wave'],
                      out['flow'], aux['commit'] + aux['codebook']])

  # One compile: the gradient of each loss, stacked on a leading axis.
  grads = jax.jit(jax.jacrev(parts))(params)
  recon, flow, vq = (jax.tree.map(lambda g, i=i: g[i], grads) for i in range(3))
  # Reconstruction: the encoder learns through the rounding (straight
  # through); nothing on the flow side moves.
  assert _norm(recon['encoder']) > 0 and _norm(recon['decoder']['scalar']) > 0
  assert _norm(recon['decoder']['estimator']) == 0
  assert _norm(recon['code_encoder']) == 0
  # Flow matching: the latent is a stop-gradient target, so neither waveform
  # encoder nor decoder moves; the code encoder learns through the VQ's
  # straight-through vectors, CodeEmbedding's layers through the features.
  assert _norm(flow['encoder']) == 0 and _norm(flow['decoder']['scalar']) == 0
  assert _norm(flow['decoder']['estimator']) > 0
  assert _norm(flow['code_encoder']) > 0 and _norm(flow['decoder']['codes']) > 0
  # VQ: the code encoder (commitment) and the shared codebooks (codebook loss).
  assert _norm(vq['code_encoder']) > 0
  assert _norm(vq['decoder']['codes']['codebooks']) > 0
  assert _norm(vq['encoder']) == 0 and _norm(vq['decoder']['estimator']) == 0


@pytest.mark.parametrize('override, key', [
    ('data.sample_rate=16000', 'config.data.sample_rate'),
    ('data.segment_seconds=0.1', 'config.data.segment_seconds'),
    ('model.estimator.in_channels=64', 'config.model.estimator.in_channels'),
    ('loss.uncond_prob=1.5', 'config.loss.uncond_prob'),
])
def test_inconsistent_configs_name_the_key(override, key):
  with pytest.raises(config_lib.ConfigError, match=key.replace('.', r'\.')):
    HeartCodecTask(_config([override]))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The tiny config trained STEPS steps on rendered chorales."""
  tmp = tmp_path_factory.mktemp('heartcodec')
  wd = str(tmp / 'run')
  c = _config([f'data.cache_dir={tmp / "cache"}', 'data.max_pieces=15',
               # 8 items: one per device of the test suite's 8 CPU devices.
               'data.batch_size=8', 'data.eval_batch_size=8',
               f'train.steps={STEPS}', 'train.log_every=50',
               f'train.eval_every={STEPS}', 'train.eval_steps=1',
               f'train.checkpoint_every={STEPS}'])
  trainer.train(c, wd)
  return c, wd


@pytest.mark.slow
def test_training_improves_the_full_decode(trained):
  _, wd = trained
  recs = metrics_lib.read_jsonl(os.path.join(wd, 'metrics.jsonl'))
  evals = {r['step']: r for r in recs if 'eval/mel_distance' in r}
  assert sorted(evals) == [0, STEPS]
  start, end = evals[0], evals[STEPS]
  assert end['eval/mel_distance'] < (1 - MARGIN) * start['eval/mel_distance'], (
      start, end)
  assert end['eval/recon/mel_distance'] < start['eval/recon/mel_distance']
  assert end['eval/loss/flow'] < start['eval/loss/flow']
  assert all(np.isfinite(r['loss/total']) for r in recs if 'loss/total' in r)


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(trained, capfd):
  c, wd = trained
  more = config_lib.load(TINY, [
      f'data.cache_dir={c.data.cache_dir}', 'data.max_pieces=15',
      'data.batch_size=8', 'data.eval_batch_size=8', 'train.log_every=1',
      'train.eval_every=0', f'train.steps={STEPS + 2}'])
  trainer.train(more, wd)
  assert f'resumed from checkpoint at step {STEPS}' in capfd.readouterr().err
  steps = [r['step'] for r in metrics_lib.read_jsonl(
      os.path.join(wd, 'metrics.jsonl')) if 'loss/total' in r]
  assert steps[-2:] == [STEPS + 1, STEPS + 2]


@pytest.mark.slow
def test_trained_run_encodes_and_detokenizes(trained):
  c, wd = trained
  # 1.6 s of an eval chorale: 20 codes, three windows of 8 codes every 6.
  long = config_lib.apply_overrides(c.copy_and_resolve_references(),
                                    ['data.segment_seconds=1.6'])
  audio = next(iter(HeartCodecTask(long).dataset('eval', 0, 1)))['audio'][:1]
  run = runs.load_run(wd)
  with run.activate():
    model = run.model
    codes = model.encode(audio)
    assert codes.shape == (1, 20, 4)
    out = model.detokenize(codes, jax.random.key(0))
  assert model.decoder.window_count(20) == 3   # the released decoder's windows
  assert out.shape == audio.shape and np.all(np.isfinite(out))
  sr = c.data.sample_rate
  decoded = float(audio_metrics.mel_distance(audio, out, sr))
  silent = float(audio_metrics.mel_distance(audio, 0 * audio, sr))
  # Measured 2.5-2.7 (silence 14.7); the eval segments after training: 2.5.
  assert decoded < 3.5 and decoded < 0.5 * silent, (decoded, silent)
