"""Audio metrics and codec losses: zero on identical inputs, sane otherwise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicjax.codec import losses
from musicjax.eval import audio_metrics as am
from tests import codec_fixtures as fx

SR = 8000


def _pair():
  x = jnp.asarray(fx.tone_mix(0.3, SR, batch=2))
  noise = 0.1 * jax.random.normal(jax.random.key(0), x.shape)
  return x, x + noise


def test_distances_zero_for_identical_positive_otherwise():
  x, y = _pair()
  assert float(am.mel_distance(x, x, SR)) == pytest.approx(0.0, abs=1e-6)
  assert float(am.stft_distance(x, x)) == pytest.approx(0.0, abs=1e-6)
  assert float(am.mel_distance(x, y, SR)) > 0.1
  assert float(am.stft_distance(x, y)) > 0.1
  cfg = fx.small_config().loss
  cfg.stft_weight = cfg.wave_weight = 1.0
  same = losses.reconstruction_losses(x, x, cfg, SR)
  diff = losses.reconstruction_losses(x, y, cfg, SR)
  for k in ('mel', 'stft', 'wave'):
    assert float(same[k]) == pytest.approx(0.0, abs=1e-6)
    assert float(diff[k]) > 0.0


def test_si_sdr():
  x, y = _pair()
  assert float(am.si_sdr(x, 0.3 * x)) > 60.0          # scale-invariant
  assert float(am.si_sdr(x, x + 0.01)) > 60.0         # zero-mean (offset ignored)
  noise = jax.random.normal(jax.random.key(1), x.shape)
  assert float(am.si_sdr(x, noise)) < -10.0
  # x + n with |n| about 10 dB below: SI-SDR near the SNR.
  snr = 10 * np.log10(np.sum(np.asarray(x) ** 2) / np.sum(np.asarray(y - x) ** 2))
  assert float(am.si_sdr(x, y)) == pytest.approx(snr, abs=1.0)
  with pytest.raises(ValueError, match='shapes differ'):
    am.si_sdr(x, x[:, :10])


def test_bitrate_and_perplexity():
  assert am.bitrate(8, 1024, 75.0) == pytest.approx(6000.0)
  assert am.bitrate(8, 8192, 12.5) == pytest.approx(1300.0)
  uniform = jnp.tile(jnp.arange(16)[None, :, None], (2, 1, 2))
  one = jnp.zeros((2, 16, 1), jnp.int32)
  np.testing.assert_allclose(am.codebook_perplexity(uniform, 16), [16.0, 16.0],
                             rtol=1e-5)
  np.testing.assert_allclose(am.codebook_perplexity(one, 16), [1.0], rtol=1e-6)


def _disc_out(value, n_feat=2):
  return [(jnp.full((2, 3, 1), value), [jnp.full((2, 4), value + i)
                                        for i in range(n_feat)])]


@pytest.mark.parametrize('adv_type', ['lsgan', 'hinge'])
def test_adversarial_losses(adv_type):
  real, fake = _disc_out(1.0), _disc_out(-1.0 if adv_type == 'hinge' else 0.0)
  # A perfect discriminator has zero loss; the generator's loss is high.
  assert float(losses.discriminator_loss(real, fake, adv_type)) == 0.0
  assert float(losses.generator_adv_loss(fake, adv_type)) == pytest.approx(1.0)
  assert float(losses.generator_adv_loss(real, adv_type)) < 1.0
  with pytest.raises(ValueError, match='config.loss.adv_type'):
    losses.discriminator_loss(real, fake, 'wgan')


def test_feature_matching_skips_logits_and_is_l1():
  real, fake = _disc_out(1.0, n_feat=3), _disc_out(0.5, n_feat=3)
  # Two non-final layers, each |1 - 0.5| = 0.5.
  assert float(losses.feature_matching_loss(real, fake)) == pytest.approx(1.0)
  assert float(losses.feature_matching_loss(real, real)) == 0.0
