"""Conv layers, encoder/decoder shapes, discriminators, configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicjax import config as cfglib
from musicjax.codec.discriminators import Discriminator
from musicjax.codec.model import CodecModel
from musicjax.codec.task import CodecTask
from musicjax.nn.conv import Snake, WNConv1d, WNConvTranspose1d
from tests import codec_fixtures as fx


@pytest.mark.parametrize('padding', ['same', 'causal'])
@pytest.mark.parametrize('stride', [1, 3, 4])
def test_conv_lengths(padding, stride):
  conv = fx.make(lambda: WNConv1d(2, 5, 2 * stride + 1, stride=stride,
                                  padding=padding, rngs=nnx.Rngs(0)))
  x = jnp.ones((2, 12 * stride, 2))
  assert conv(x).shape == (2, 12, 5)
  up = fx.make(lambda: WNConvTranspose1d(5, 3, stride, padding=padding,
                                         rngs=nnx.Rngs(0)))
  assert up(conv(x)).shape == (2, 12 * stride, 3)


def test_causal_conv_ignores_future():
  conv = fx.make(lambda: WNConv1d(1, 4, 5, dilation=2, padding='causal',
                                  rngs=nnx.Rngs(0)))
  up = fx.make(lambda: WNConvTranspose1d(1, 2, 4, padding='causal',
                                         rngs=nnx.Rngs(1)))
  x = jax.random.normal(jax.random.key(0), (1, 40, 1))
  y = x.at[:, 30:].set(5.0)
  np.testing.assert_allclose(conv(x)[:, :30], conv(y)[:, :30], atol=1e-5)
  assert not np.allclose(conv(x)[:, 30:], conv(y)[:, 30:])
  np.testing.assert_allclose(up(x)[:, :120], up(y)[:, :120], atol=1e-5)


def test_weight_norm_is_scale_invariant_in_v():
  conv = fx.make(lambda: WNConv1d(3, 4, 3, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (1, 16, 3))
  y0 = conv(x)
  conv.v[...] = conv.v[...] * 7.0
  np.testing.assert_allclose(y0, conv(x), atol=1e-5)
  conv.g[...] = conv.g[...] * 2.0
  np.testing.assert_allclose(2 * (y0 - conv.bias[...]), conv(x) - conv.bias[...],
                             atol=1e-4)


def test_snake_values():
  s = fx.make(lambda: Snake(2))
  s.alpha[...] = jnp.array([1.0, 2.0])
  x = jnp.array([[[0.5, 0.5]]])
  expect = 0.5 + np.sin(np.array([0.5, 1.0])) ** 2 / np.array([1.0, 2.0])
  np.testing.assert_allclose(s(x)[0, 0], expect, rtol=1e-6)


def test_bad_padding_is_an_error():
  with pytest.raises(ValueError, match='padding'):
    fx.make(lambda: WNConv1d(1, 1, 3, padding='left', rngs=nnx.Rngs(0)))


@pytest.mark.parametrize('sr,strides,rate', [
    (8000, (2, 4), 1000.0),
    (16000, (4, 8, 8), 62.5),
    (24000, (2, 4, 5, 8), 75.0),
    (24000, (2, 4, 5, 6, 8), 12.5),
])
def test_encoder_decoder_shapes_and_hop(sr, strides, rate):
  c = fx.small_config()
  c.model.strides = strides
  c.model.decoder_dim = 2 ** len(strides) * 2
  c.model.encoder_dim = 2
  c.model.dilations = (1,)
  c.data.sample_rate = sr
  m = fx.make(lambda: CodecModel(c.model, sr, 2, rngs=nnx.Rngs(0)))
  hop = int(np.prod(strides))
  assert m.hop_length == hop and m.frame_rate == pytest.approx(rate)
  audio = jax.ShapeDtypeStruct((2, 3 * hop, 2), jnp.float32)
  # Shapes only (abstract evaluation keeps this test fast).
  codes = jax.eval_shape(m.encode, audio)
  assert codes.shape == (2, 3, 3) and codes.dtype == jnp.int32
  assert jax.eval_shape(m.decode, codes).shape == (2, 3 * hop, 2)
  one = jax.ShapeDtypeStruct((2, 3, 1), jnp.int32)
  assert jax.eval_shape(m.decode, one).shape == (2, 3 * hop, 2)
  # Non-multiple lengths are padded up to whole frames.
  odd = jax.ShapeDtypeStruct((1, 3 * hop + 1, 2), jnp.float32)
  assert jax.eval_shape(m.encode, odd).shape == (1, 4, 3)
  recon, aux = jax.eval_shape(lambda a: m(a, jax.random.key(0), train=False), audio)
  assert recon.shape == audio.shape and aux['codes'].shape == (2, 3, 3)


def test_wrong_channel_count_is_an_error():
  c = fx.small_config()
  m = fx.make(lambda: CodecModel(c.model, 8000, 1, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'\[batch, time, 1\]'):
    m.encode(jnp.zeros((1, 64, 2)))


def test_discriminator_output_shapes():
  c = fx.small_config()
  c.disc.periods = (2, 3)
  c.disc.stft_fft_sizes = (128, 64)
  d = fx.make(lambda: Discriminator(c.disc, rngs=nnx.Rngs(0)))
  outs = jax.eval_shape(d, jax.ShapeDtypeStruct((3, 1000, 2), jnp.float32))
  assert len(outs) == 4
  n_layers = [len(c.disc.period_channels) + 1] * 2 + [
      2 * c.disc.stft_layers + 1] * 2
  for (logits, feats), nl in zip(outs, n_layers):
    assert logits.shape[0] == 6 and logits.shape[-1] == 1   # batch x channels
    assert len(feats) == nl and feats[-1].shape == logits.shape
  # Period p: time folded into rows of p columns.
  assert outs[0][0].shape[2] == 2 and outs[1][0].shape[2] == 3


@pytest.mark.parametrize('name', ['tiny', 'base', 'heartcodec_12hz'])
def test_configs_load_and_validate(name):
  c = cfglib.load(f'configs/codec/{name}.py')
  assert c.task == 'codec'
  task = CodecTask(c)
  spec = task.batch_spec(c.data.batch_size)['audio']
  assert spec.shape == (c.data.batch_size,
                        round(c.data.segment_seconds * c.data.sample_rate),
                        c.data.channels)
  with pytest.raises(cfglib.ConfigError, match='config.model.rvq.codebook_sise'):
    cfglib.load(f'configs/codec/{name}.py', ['model.rvq.codebook_sise=3'])


def test_config_rates():
  base = cfglib.load('configs/codec/base.py')
  heart = cfglib.load('configs/codec/heartcodec_12hz.py')
  for c, rate, kbps in ((base, 75.0, 6.0), (heart, 12.5, 1.3)):
    hop = np.prod(c.model.strides)
    assert c.data.sample_rate / hop == rate
    bits = c.model.rvq.num_codebooks * np.log2(c.model.rvq.codebook_size) * rate
    assert bits / 1000 == pytest.approx(kbps)
  assert heart.model.rvq.num_codebooks == 8 and heart.model.rvq.codebook_size == 8192


def test_segment_not_multiple_of_hop_names_the_key():
  c = fx.small_config()
  c.data.segment_seconds = 0.1001
  with pytest.raises(ValueError, match='config.data.segment_seconds'):
    CodecTask(c).batch_spec(2)


def test_heartcodec_abstract_state_and_param_count():
  c = cfglib.load('configs/codec/heartcodec_12hz.py')
  task = CodecTask(c)
  with nnx.use_eager_sharding(False):
    state = nnx.eval_shape(lambda: task.create_state(nnx.Rngs(0)))
  n_gen = sum(int(np.prod(x.shape)) for x in
              jax.tree.leaves(nnx.state(state.generator, nnx.Param)))
  n_disc = sum(int(np.prod(x.shape)) for x in
               jax.tree.leaves(nnx.state(state.discriminator, nnx.Param)))
  assert 20e6 < n_gen < 400e6, n_gen
  assert n_disc > 1e6
  cb = state.generator.quantizer.codebook
  assert cb.shape == (8, 8192, c.model.rvq.codebook_dim)
  assert cb.get_metadata()['out_sharding'] == (None, 'codebook', None)
