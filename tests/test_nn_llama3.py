"""Our transformer stack as a Llama 3.2 backbone (HeartMuLa's): the same
hidden states as `transformers`' LlamaModel on the same weights, with Llama-3
rotary scaling, on a tiny random-init config.

transformers' Llama keeps rotary pairs in the rotate-half layout, as we do, so
the weights map by transposes and reshapes alone.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicjax.config import ConfigError
from musicjax.nn import transformer as T

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# float32 on both sides; the gap is summation order over 2 layers of width 64.
TOL = 2e-5


def _configs(scaling: str):
  c = T.default_config()
  c.num_layers, c.dim, c.num_heads, c.num_kv_heads = 2, 64, 4, 2
  c.mlp_dim, c.init_std = 96, 0.2
  c.rope_theta, c.rope_scaling = 500_000.0, scaling
  c.rope_scale_factor, c.rope_low_freq_factor = 32.0, 1.0
  # Small, so that the tiny head's 8 frequencies span all three bands of the
  # scaling (kept, blended, slowed) and positions up to 300 tell them apart.
  c.rope_high_freq_factor, c.rope_original_context = 4.0, 64
  rope = {'rope_type': 'default', 'rope_theta': c.rope_theta}
  if scaling == 'llama3':
    rope.update(rope_type='llama3', factor=c.rope_scale_factor,
                low_freq_factor=c.rope_low_freq_factor,
                high_freq_factor=c.rope_high_freq_factor,
                original_max_position_embeddings=c.rope_original_context)
  hf = transformers.LlamaConfig(
      vocab_size=8, hidden_size=c.dim, intermediate_size=c.mlp_dim,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.norm_eps,
      max_position_embeddings=4096, rope_parameters=rope,
      attention_bias=False, mlp_bias=False,
      initializer_range=0.2)  # sharp attention: phases matter
  hf._attn_implementation = 'eager'  # pylint: disable=protected-access
  return c, hf


def _ours_from(hf_model, c):
  """Our stack holding the LlamaModel's weights (layers stacked)."""
  e, h, kv = c.dim, c.num_heads, c.num_kv_heads
  d = e // h
  sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}

  def stack(fmt, fn):
    return jnp.asarray(np.stack([fn(sd[fmt.format(i)])
                                 for i in range(c.num_layers)]))

  with nnx.use_eager_sharding(False):
    model = T.Transformer(c, nnx.Rngs(0))
  a, m = model.layers.attn, model.layers.mlp
  a.wq[...] = stack('layers.{}.self_attn.q_proj.weight',
                    lambda w: w.T.reshape(e, h, d))
  a.wk[...] = stack('layers.{}.self_attn.k_proj.weight',
                    lambda w: w.T.reshape(e, kv, d))
  a.wv[...] = stack('layers.{}.self_attn.v_proj.weight',
                    lambda w: w.T.reshape(e, kv, d))
  a.wo[...] = stack('layers.{}.self_attn.o_proj.weight',
                    lambda w: w.T.reshape(h, d, e))
  m.gate[...] = stack('layers.{}.mlp.gate_proj.weight', lambda w: w.T)
  m.up[...] = stack('layers.{}.mlp.up_proj.weight', lambda w: w.T)
  m.down[...] = stack('layers.{}.mlp.down_proj.weight', lambda w: w.T)
  model.layers.attn_norm.scale[...] = stack(
      'layers.{}.input_layernorm.weight', lambda w: w)
  model.layers.mlp_norm.scale[...] = stack(
      'layers.{}.post_attention_layernorm.weight', lambda w: w)
  model.norm.scale[...] = jnp.asarray(sd['norm.weight'])
  return model


def _forward_both(scaling, positions):
  c, hf = _configs(scaling)
  torch.manual_seed(0)
  hf_model = transformers.LlamaModel(hf).eval()
  with torch.no_grad():  # non-trivial norm weights
    for name, p in hf_model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1 + 0.3 * torch.randn_like(p))
  model = _ours_from(hf_model, c)
  b, t = positions.shape
  x = np.random.default_rng(1).normal(size=(b, t, c.dim)).astype(np.float32)
  with torch.no_grad():
    want = hf_model(inputs_embeds=torch.as_tensor(x),
                    position_ids=torch.as_tensor(positions)).last_hidden_state
  mask = T.causal_mask(jnp.ones((b, t), bool))
  got, _ = nnx.jit(lambda m, x, p: m(x, p, mask))(
      model, jnp.asarray(x), jnp.asarray(positions, jnp.int32))
  return np.asarray(got), want.numpy(), c


@pytest.mark.parametrize('scaling', ['none', 'llama3'])
def test_hidden_states_equal_transformers_llama(scaling):
  # Spaced positions (explicit, as for left-padded prompts), so that relative
  # distances reach 275, where the scaled and plain phases differ.
  positions = 25 * np.arange(12)[None].repeat(2, 0) + np.array([[0], [290]])
  got, want, _ = _forward_both(scaling, positions)
  np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_llama3_scaling_changes_the_phases():
  """The comparison above would pass with scaling ignored if it never
  mattered: it must, by far more than the tolerance."""
  c, _ = _configs('llama3')
  plain = np.asarray(T.Rotary(c.rope_theta).frequencies(8))
  scaled = np.asarray(T.Rotary.from_config(c).frequencies(8))
  kept = np.isclose(plain, scaled, rtol=1e-6)
  slowed = np.isclose(plain / c.rope_scale_factor, scaled, rtol=1e-6)
  assert kept.any() and slowed.any() and (~kept & ~slowed).any()
  positions = 25 * np.arange(12)[None] + 290
  got, _, _ = _forward_both('llama3', positions)
  other, _, _ = _forward_both('none', positions)
  assert np.abs(got - other).max() > 100 * TOL


def test_frequencies_equal_transformers_llama3_init():
  c, hf = _configs('llama3')
  c.rope_original_context = 8192  # the released value, on a real head size
  hf.rope_parameters['original_max_position_embeddings'] = 8192
  hf.head_dim = 128
  init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS['llama3']
  want, _ = init(hf, 'cpu')
  got = T.Rotary.from_config(c).frequencies(64)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)


@pytest.mark.parametrize('key, value, match', [
    ('rope_scaling', 'yarn', "rope_scaling must be 'none' or 'llama3'"),
    ('rope_scale_factor', 0.5, 'rope_scale_factor must be >= 1'),
    ('rope_high_freq_factor', 1.0, 'rope_low_freq_factor < rope_high'),
])
def test_bad_scaling_config_names_the_key(key, value, match):
  c, _ = _configs('llama3')
  c[key] = value
  with pytest.raises(ConfigError, match=match):
    T.check_config(c, 'model.backbone')
