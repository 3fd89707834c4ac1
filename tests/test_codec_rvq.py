"""Residual VQ: lookup, dropout, EMA, k-means init, dead-code restart."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicjax.codec.rvq import CodebookStat, ResidualVQ
from tests import codec_fixtures as fx

D = 8


def _latents(seed=0, b=4, f=32):
  return jax.random.normal(jax.random.key(seed), (b, f, D))


@pytest.mark.parametrize('factorized', [True, False])
def test_codes_in_range_and_decode_matches_forward(factorized):
  q = fx.make(lambda: ResidualVQ(D, fx.rvq_config(factorized=factorized,
                                                  kmeans_init=False),
                                 rngs=nnx.Rngs(0)))
  z = _latents()
  z_q, codes, aux = q(z, jax.random.key(1), train=False)
  assert codes.shape == (4, 32, 4) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < 16
  np.testing.assert_array_equal(np.asarray(q.encode(z)), np.asarray(codes))
  np.testing.assert_allclose(np.asarray(q.decode(codes)), np.asarray(z_q),
                             atol=1e-5)
  assert aux['perplexity'].shape == (4,)


def test_error_decreases_with_more_codebooks():
  # Plain Euclidean codes: with untrained factorized projections the error
  # is not expected to fall (the overfit test covers the factorized path).
  cfg = fx.rvq_config(factorized=False, codebook_type='ema', kmeans_init=True,
                      kmeans_iters=10, num_codebooks=4, codebook_size=32,
                      codebook_dim=D)
  q = fx.make(lambda: ResidualVQ(D, cfg, rngs=nnx.Rngs(0)))
  z = _latents(b=8, f=64)
  # k-means initialises each stage on its own residual.
  _, _, aux = q(z, jax.random.key(1), train=True)
  q.apply_updates(aux['updates'])
  errs = [float(jnp.mean((q.decode(q.encode(z, n)) - z) ** 2)) for n in range(1, 5)]
  assert all(b < a for a, b in zip(errs, errs[1:])), errs
  assert errs[-1] < 0.6 * errs[0], errs


def test_n_q_out_of_range_is_an_error():
  q = fx.make(lambda: ResidualVQ(D, fx.rvq_config(), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='num_codebooks'):
    q.encode(_latents(), n_q=5)


def test_quantizer_dropout_uses_prefix_of_codebooks():
  cfg = fx.rvq_config(quantizer_dropout=1.0, kmeans_init=False)
  q = fx.make(lambda: ResidualVQ(D, cfg, rngs=nnx.Rngs(0)))
  z = _latents(b=16)
  z_q, codes, aux = q(z, jax.random.key(3), train=True)
  n_q = np.asarray(aux['n_q'])
  assert n_q.min() >= 1 and n_q.max() <= 4 and n_q.min() < 4
  for i in range(16):
    expect = q.decode(codes[i:i + 1, :, :n_q[i]])
    np.testing.assert_allclose(np.asarray(z_q[i:i + 1]), np.asarray(expect), atol=1e-5)
  # Without training there is no dropout.
  _, _, aux_eval = q(z, jax.random.key(3), train=False)
  assert np.all(np.asarray(aux_eval['n_q']) == 4)


def test_ema_update_moves_codewords_toward_assigned_vectors():
  cfg = fx.rvq_config(factorized=False, codebook_type='ema', kmeans_init=False,
                      num_codebooks=1, codebook_size=8, ema_decay=0.5)
  q = fx.make(lambda: ResidualVQ(D, cfg, rngs=nnx.Rngs(0)))
  z = _latents(b=2, f=16)
  before = np.asarray(q.codebook[...][0])
  _, codes, aux = q(z, jax.random.key(0), train=True)
  q.apply_updates(aux['updates'])
  after = np.asarray(q.codebook[...][0])
  flat, c = np.asarray(z).reshape(-1, D), np.asarray(codes).reshape(-1)
  moved = 0
  for j in np.unique(c):
    mean = flat[c == j].mean(0)
    assert np.linalg.norm(after[j] - mean) < np.linalg.norm(before[j] - mean)
    moved += 1
  assert moved >= 2
  assert isinstance(q.cluster_size, CodebookStat)


def test_kmeans_init_sets_codebook_from_data():
  centres = np.array([[5., 0, 0, 0, 0, 0, 0, 0], [0, 5., 0, 0, 0, 0, 0, 0],
                      [0, 0, 5., 0, 0, 0, 0, 0], [0, 0, 0, -5., 0, 0, 0, 0]])
  rng = np.random.default_rng(0)
  pts = centres[rng.integers(0, 4, 256)] + 0.05 * rng.standard_normal((256, D))
  cfg = fx.rvq_config(factorized=False, codebook_type='ema', kmeans_init=True,
                      kmeans_iters=10, num_codebooks=1, codebook_size=4)
  q = fx.make(lambda: ResidualVQ(D, cfg, rngs=nnx.Rngs(0)))
  assert not bool(q.initialized[...])
  z = jnp.asarray(pts.reshape(4, 64, D), jnp.float32)
  _, _, aux = q(z, jax.random.key(2), train=True)
  q.apply_updates(aux['updates'])
  assert bool(q.initialized[...])
  cb = np.asarray(q.codebook[...][0])
  # Every codeword sits on a cluster centre.
  dist = np.linalg.norm(cb[:, None] - centres[None], axis=-1).min(1)
  assert np.all(dist < 0.5), dist
  # A second forward does not re-run k-means.
  _, _, aux2 = q(z, jax.random.key(5), train=True)
  assert np.allclose(np.asarray(aux2['updates']['codebook'][0]), cb, atol=0.3)


@pytest.mark.parametrize('codebook_type', ['ema', 'learned'])
def test_dead_code_restart_replaces_unused_code(codebook_type):
  cfg = fx.rvq_config(factorized=False, codebook_type=codebook_type,
                      kmeans_init=False, num_codebooks=1, codebook_size=4,
                      dead_code_threshold=0.6, ema_decay=0.5)
  q = fx.make(lambda: ResidualVQ(D, cfg, rngs=nnx.Rngs(0)))
  z = _latents(b=2, f=16)
  flat = np.asarray(z).reshape(-1, D)
  far = np.full((D,), 100.0, np.float32)   # never the nearest code
  cb = np.asarray(q.codebook[...]).copy()
  cb[0, 3] = far
  q.codebook[...] = jnp.asarray(cb)
  q.embed_sum[...] = jnp.asarray(cb)
  _, codes, aux = q(z, jax.random.key(4), train=True)
  assert 3 not in np.asarray(codes)
  q.apply_updates(aux['updates'])
  new = np.asarray(q.codebook[...][0, 3])
  assert not np.allclose(new, far)
  # The replacement is one of the current batch's vectors.
  assert np.min(np.linalg.norm(flat - new, axis=1)) < 1e-5
  assert int(aux['dead_codes'][0]) >= 1
  # Deterministic given the rng.
  q2 = fx.make(lambda: ResidualVQ(D, cfg, rngs=nnx.Rngs(0)))
  q2.codebook[...] = jnp.asarray(cb)
  q2.embed_sum[...] = jnp.asarray(cb)
  _, _, aux2 = q2(z, jax.random.key(4), train=True)
  np.testing.assert_array_equal(np.asarray(aux2['updates']['codebook']),
                                np.asarray(aux['updates']['codebook']))


def test_bad_codebook_type_names_the_key():
  with pytest.raises(ValueError, match='codebook_type'):
    fx.make(lambda: ResidualVQ(D, fx.rvq_config(codebook_type='vq'),
                               rngs=nnx.Rngs(0)))


def test_learned_codebook_gets_gradient_ema_does_not():
  for kind, expect_param in (('learned', True), ('ema', False)):
    q = fx.make(lambda: ResidualVQ(D, fx.rvq_config(codebook_type=kind,
                                                    kmeans_init=False),
                                   rngs=nnx.Rngs(0)))
    assert isinstance(q.codebook, nnx.Param) == expect_param
    params = nnx.state(q, nnx.Param)
    names = {'/'.join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert ('codebook' in names) == expect_param
