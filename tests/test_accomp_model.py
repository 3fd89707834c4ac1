"""The dual-track bidirectional transformer of the accompaniment model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicjax.accomp import model as M


def _config(k=1):
  c = M.default_config()
  c.num_codebooks = k
  c.codebook_size = 16
  c.text_vocab_size = 10
  c.embed_init_std = 0.5
  b = c.backbone
  b.num_layers, b.dim, b.num_heads, b.num_kv_heads, b.mlp_dim = 2, 32, 4, 2, 64
  b.init_std = 0.1
  return c


def _inputs(k, b=2, t=6, seed=0):
  r = np.random.default_rng(seed)
  return dict(
      vocal=jnp.asarray(r.integers(0, 16, (b, t, k)), jnp.int32),
      accomp=jnp.asarray(r.integers(0, 16, (b, t, k)), jnp.int32),
      valid=jnp.ones((b, t), bool),
      text_ids=jnp.asarray(r.integers(0, 10, (b, 4)), jnp.int32),
      text_valid=jnp.ones((b,), bool),
      ref_codes=jnp.asarray(r.integers(0, 16, (b, 5, k)), jnp.int32),
      ref_valid=jnp.ones((b,), bool))


def _make(k):
  with nnx.use_eager_sharding(False):
    return M.AccompModel(_config(k), nnx.Rngs(0))


def _run(m, x, use_text=True, use_ref=True):
  b = x['vocal'].shape[0]
  p = m.prefix(x['text_ids'], x['text_valid'], x['ref_codes'], x['ref_valid'],
               jnp.full((b,), use_text), jnp.full((b,), use_ref))
  return m.hidden(x['vocal'], x['accomp'], x['valid'], p)


@pytest.mark.parametrize('k', [1, 3])
def test_shapes_and_per_codebook_heads(k):
  m, x = _make(k), _inputs(k)
  h = _run(m, x)
  assert h.shape == (2, 6, 32)
  assert m.logits(h).shape == (2, 6, k, 16)
  assert m.rtd_logits(h).shape == (2, 6, k)


def test_attention_is_bidirectional():
  m, x = _make(1), _inputs(1)
  h0 = _run(m, x)
  x2 = dict(x, accomp=x['accomp'].at[:, -1, 0].set((x['accomp'][:, -1, 0] + 3) % 16))
  h1 = _run(m, x2)
  # Changing the last frame changes the first frame's output.
  assert np.abs(np.asarray(h1[:, 0] - h0[:, 0])).max() > 1e-4


def test_dropped_or_missing_prefix_uses_its_learned_null():
  m, x = _make(1), _inputs(1)
  b = 2
  p = m.prefix(x['text_ids'], x['text_valid'], x['ref_codes'], x['ref_valid'],
               jnp.zeros((b,), bool), jnp.ones((b,), bool))
  null = np.asarray(m.null_prefix[...])
  np.testing.assert_allclose(np.asarray(p[:, 0]), np.broadcast_to(null[0], (b, 32)))
  assert np.abs(np.asarray(p[:, 1]) - null[1]).max() > 1e-3
  p2 = m.prefix(x['text_ids'], x['text_valid'], x['ref_codes'],
                jnp.zeros((b,), bool), jnp.ones((b,), bool), jnp.ones((b,), bool))
  np.testing.assert_allclose(np.asarray(p2[:, 1]), np.broadcast_to(null[1], (b, 32)))


def test_vocal_and_accompaniment_fill_separate_halves():
  m, x = _make(1), _inputs(1)
  e_v = m.track_embedding(m.vocal_embed[...], x['vocal'])
  e_a = m.track_embedding(m.accomp_embed[...], x['accomp'])
  assert e_v.shape[-1] == e_a.shape[-1] == 16
  # MASK and PAD are real rows of the accompaniment table only.
  assert m.accomp_embed.shape[1] == 16 + 2 and m.vocal_embed.shape[1] == 16 + 1


def test_rtd_gradient_reaches_the_backbone():
  """The detection loss must train the backbone, not only its head (the
  released code runs this pass without gradients)."""
  m, x = _make(1), _inputs(1)
  gdef, params, rest = nnx.split(m, nnx.Param, ...)
  labels = jnp.asarray(np.random.default_rng(1).integers(0, 2, (2, 6, 1)), jnp.float32)

  def rtd_loss(p):
    mm = nnx.merge(gdef, p, rest)
    logits = mm.rtd_logits(_run(mm, x))
    return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)

  grads = jax.grad(rtd_loss)(params)
  backbone = jax.tree.leaves(nnx.state(grads.backbone) if hasattr(grads, 'backbone')
                             else grads['backbone'])
  assert max(float(jnp.abs(g).max()) for g in backbone) > 0
