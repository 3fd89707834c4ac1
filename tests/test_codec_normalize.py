"""EnCodec-style input normalisation (model.normalize): codes that do not
depend on the input level, and a per-frame scale kept beside them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicjax.codec import chunked
from musicjax.codec.model import CodecModel
from musicjax.errors import UserError
from tests import codec_fixtures as cf

SR = 8000  # codec_fixtures.small_config


def _model(normalize: bool) -> CodecModel:
  c = cf.small_config()
  c.model.normalize = normalize
  return cf.make(lambda: CodecModel(c.model, SR, 1, rngs=nnx.Rngs(0)))


@pytest.fixture(scope='module')
def model():
  return _model(True)


def _music(seconds: float) -> np.ndarray:
  return cf.tone_mix(seconds, SR)[0]  # [T, 1], peak 0.5


def test_codes_ignore_the_input_level_only_with_normalize(model):
  x = jnp.asarray(_music(0.5)[None])
  # x / 8 is exact in floats: the normalised input is bit for bit the same.
  np.testing.assert_array_equal(model.encode(x / 8), model.encode(x))
  plain = _model(False)
  assert not np.array_equal(plain.encode(x / 8), plain.encode(x))


def test_forward_and_decode_restore_the_input_level(model):
  x = jnp.asarray(_music(0.5)[None])
  scale = model.input_scale(x)
  rms = float(jnp.sqrt(jnp.mean(x ** 2)))
  np.testing.assert_allclose(float(scale[0, 0, 0]),
                             rms / model.normalize_rms + model.normalize_eps,
                             rtol=1e-6)
  recon, _ = model(x, jax.random.key(0), False)
  want = model.decode(model.encode(x), scale)[:, :x.shape[1]]
  np.testing.assert_allclose(recon, want, rtol=1e-5, atol=1e-7)
  quiet, _ = model(x / 8, jax.random.key(0), False)
  np.testing.assert_allclose(quiet, recon / 8, rtol=1e-5, atol=1e-8)


def test_chunked_scales_are_per_window_and_decode_applies_them(model):
  # Three 1 s sections at -6, -26 and -46 dB: windows of 1 s, no context.
  x = np.concatenate([_music(1.0) * g for g in (1.0, 0.1, 0.01)])
  kw = dict(chunk_seconds=1.0, context_seconds=0.0)
  codes = chunked.encode_array(model, x, progress=False, **kw)
  scales = chunked.frame_scales(model, x, **kw)
  frames = int(model.frame_rate)
  assert scales.shape == (codes.shape[0],) == (3 * frames,)
  for i, gain in enumerate((1.0, 0.1, 0.01)):
    section = x[i * SR:(i + 1) * SR]
    want = np.sqrt(np.mean(section ** 2)) / model.normalize_rms + model.normalize_eps
    np.testing.assert_allclose(scales[i * frames:(i + 1) * frames], want, rtol=1e-6)
    # Each window was encoded at the normalised level: the same codes.
    np.testing.assert_array_equal(codes[i * frames:(i + 1) * frames], codes[:frames])
    del gain
  plain = chunked.decode_array(model, codes, progress=False, **kw)
  scaled = chunked.decode_array(model, codes, scales=scales, progress=False, **kw)
  np.testing.assert_allclose(scaled, plain * np.repeat(scales, model.hop_length)[:, None],
                             rtol=1e-6)
  # Decoded at the input's level: the quiet sections come out quiet again.
  levels = [np.sqrt(np.mean(scaled[i * SR:(i + 1) * SR] ** 2)) for i in range(3)]
  np.testing.assert_allclose(np.diff(20 * np.log10(levels)), [-20, -20], atol=0.5)
  assert chunked.frame_scales(_model(False), x, **kw) is None


def test_codes_file_scale_is_checked(tmp_path):
  meta = dict(format=chunked.CODES_FORMAT, sample_rate=SR, num_samples=64,
              hop_length=16, codebook_size=32)
  codes = np.zeros((4, 2), np.int16)
  good = str(tmp_path / 'good.npz')
  np.savez(good, codes=codes, scale=np.full(4, 0.5, np.float32), **meta)
  np.testing.assert_array_equal(chunked.load_codes(good)['scale'], 0.5)
  for name, scale in (('short', np.ones(3, np.float32)),
                      ('negative', -np.ones(4, np.float32)),
                      ('ints', np.ones(4, np.int32))):
    path = str(tmp_path / f'{name}.npz')
    np.savez(path, codes=codes, scale=scale, **meta)
    with pytest.raises(UserError, match="not a musicjax codes file.*'scale'"):
      chunked.load_codes(path)
