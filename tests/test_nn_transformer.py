"""Llama-style blocks (musicjax/nn/transformer.py) against numpy, and the cached
decode path against the full causal forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm_fixtures as F
from musicjax import tasks
from musicjax.config import ConfigError
from musicjax.nn import transformer as T


def _config(**kw):
  c = T.default_config()
  c.num_layers = 2
  c.dim = 32
  c.num_heads = 4
  c.num_kv_heads = 2
  c.mlp_dim = 48
  c.init_std = 0.2
  for k, v in kw.items():
    c[k] = v
  return c


def _make(c, seed=0):
  with nnx.use_eager_sharding(False):
    return T.Transformer(c, nnx.Rngs(seed))


# ------------------------------------------------------------------ RMSNorm
def test_rmsnorm_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32) * 3.0
  scale = rng.normal(size=(8,)).astype(np.float32)
  eps = 1e-3
  with nnx.use_eager_sharding(False):
    norm = T.RMSNorm(8, eps)
  norm.scale[...] = jnp.asarray(scale)
  want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True)
                     + eps) * scale
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want,
                             rtol=1e-5, atol=1e-6)
  # Low-precision inputs are normalised in float32 and keep their dtype.
  y = norm(jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2,
                             atol=2e-2)


# --------------------------------------------------------------------- rope
def _rope_numpy(x, positions, theta):
  """Rotate-half layout: (x[:h], x[h:]) are the real and imaginary parts."""
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) / half)
  z = (x[..., :half] + 1j * x[..., half:]).astype(np.complex128)
  z = z * np.exp(1j * positions[..., None, None] * freq)
  return np.concatenate([z.real, z.imag], -1)


def test_rope_matches_complex_rotation_and_preserves_norms():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 100, (2, 6)).astype(np.int32)
  y = np.asarray(T.rope(jnp.asarray(x), jnp.asarray(pos), T.Rotary(10000.0)))
  np.testing.assert_allclose(y, _rope_numpy(x, pos, 10000.0), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1),
                             np.linalg.norm(x, axis=-1), rtol=1e-5)
  # Position 0 is the identity.
  y0 = T.rope(jnp.asarray(x), jnp.zeros((2, 6), jnp.int32), T.Rotary(10000.0))
  np.testing.assert_allclose(np.asarray(y0), x, rtol=1e-6, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(i, j):
    rq = T.rope(q, jnp.asarray([[i]], jnp.int32), T.Rotary(100.0))
    rk = T.rope(k, jnp.asarray([[j]], jnp.int32), T.Rotary(100.0))
    return float(jnp.sum(rq * rk))

  for i, j in [(0, 0), (5, 2), (2, 5), (7, 0)]:
    base = score(i, j)
    for shift in (1, 13, 200):
      assert score(i + shift, j + shift) == pytest.approx(base, rel=1e-4,
                                                          abs=1e-4)
  # ... and does depend on it (the rotation is not trivial).
  assert abs(score(5, 2) - score(5, 4)) > 1e-2
  assert abs(score(5, 2) - score(2, 5)) > 1e-2


# ---------------------------------------------------------------- attention
def _attend_numpy(q, k, v, mask):
  """Per-head softmax attention with each KV head repeated for its group."""
  b, t, h, d = q.shape
  g = h // k.shape[1]
  out = np.zeros((b, t, h, d))
  for bi in range(b):
    for hi in range(h):
      kh, vh = k[bi, hi // g].astype(np.float64), v[bi, hi // g]
      s = q[bi, :, hi].astype(np.float64) @ kh.T / np.sqrt(d)     # [T, S]
      for ti in range(t):
        m = mask[bi, ti]
        if not m.any():   # every key masked: a uniform average, not NaN
          out[bi, ti, hi] = vh.mean(0)
          continue
        p = np.exp(s[ti, m] - s[ti, m].max())
        out[bi, ti, hi] = (p / p.sum()) @ vh[m]
  return out


@pytest.mark.parametrize('kv_heads', [4, 2, 1])   # group sizes 1, 2, 4
def test_gqa_attend_matches_naive_per_head_attention(kv_heads):
  rng = np.random.default_rng(kv_heads)
  b, t, s, h, d = 2, 5, 7, 4, 8
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  k = rng.normal(size=(b, kv_heads, s, d)).astype(np.float32)
  v = rng.normal(size=(b, kv_heads, s, d)).astype(np.float32)
  key_valid = np.ones((b, s), bool)
  key_valid[0, :3] = False               # left padding in row 0
  key_valid[1, 4] = False                # a hole in row 1
  mask = key_valid[:, None, :] & (np.arange(s)[None, :] <= np.arange(t)[:, None]
                                  + 2)[None]
  assert not mask[0, 0].any()            # row 0, query 0 sees nothing
  got = T.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                 jnp.asarray(mask))
  assert got.shape == (b, t, h, d)
  np.testing.assert_allclose(np.asarray(got), _attend_numpy(q, k, v, mask),
                             rtol=1e-5, atol=1e-5)


def test_causal_and_cache_masks():
  valid = np.array([[False, False, True, True, True],
                    [True, True, True, True, True]])
  t = valid.shape[1]
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  m = np.asarray(T.causal_mask(jnp.asarray(valid)))
  np.testing.assert_array_equal(m, valid[:, None, :] & (j <= i)[None])
  # Bidirectional: every valid key (the mask may come back broadcastable).
  m = np.asarray(T.causal_mask(jnp.asarray(valid), causal=False))
  np.testing.assert_array_equal(np.broadcast_to(m, (2, t, t)),
                                np.broadcast_to(valid[:, None, :], (2, t, t)))
  # Three new tokens written at slot 1 of a 5-slot cache: query n sits in slot
  # 1 + n and sees the valid slots up to its own.
  m = np.asarray(T.cache_mask(jnp.asarray(valid), 1, 3))
  assert m.shape == (2, 3, t)
  q_slot = 1 + np.arange(3)[:, None]
  np.testing.assert_array_equal(m, valid[:, None, :] & (j <= q_slot)[None])
  # The index may be traced (decode loops).
  m2 = jax.jit(lambda kv, i: T.cache_mask(kv, i, 3))(jnp.asarray(valid), 1)
  np.testing.assert_array_equal(np.asarray(m2), m)
  # The full causal mask is the cache mask of the whole sequence at slot 0.
  np.testing.assert_array_equal(
      np.asarray(T.cache_mask(jnp.asarray(valid), 0, t)),
      np.asarray(T.causal_mask(jnp.asarray(valid))))


# ------------------------------------------------------ cache vs full forward
def test_cached_decode_equals_full_causal_forward():
  c = _config()
  model = _make(c)
  rng = np.random.default_rng(3)
  b, t = 3, 9
  x = jnp.asarray(rng.normal(size=(b, t, c.dim)), jnp.float32)
  valid = np.ones((b, t), bool)
  valid[0, :3] = False                  # left padding (invalid cache slots)
  valid[1, :1] = False
  # Explicit positions: counted over valid slots, and row 2 starts at 40.
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
  positions[2] += 40
  positions = jnp.asarray(positions, jnp.int32)

  @nnx.jit  # one compile per shape instead of one per eager op
  def forward(m, x, pos, mask):
    return m(x, pos, mask)

  @nnx.jit
  def step(m, x, pos, mask, cache, index):
    return m(x, pos, mask, cache, index)

  full, none = forward(model, x, positions, T.causal_mask(jnp.asarray(valid)))
  assert none is None and full.shape == (b, t, c.dim)

  key_valid = jnp.asarray(valid)
  # Prefill 4 slots at once, then decode one token at a time.
  cache = model.init_cache(b, t)
  assert cache['k'].shape == (c.num_layers, b, c.num_kv_heads, t,
                              c.dim // c.num_heads)
  outs = []
  out, cache = step(model, x[:, :4], positions[:, :4],
                    T.cache_mask(key_valid, 0, 4), cache, jnp.int32(0))
  outs.append(out)
  for i in range(4, t):
    out, cache = step(model, x[:, i:i + 1], positions[:, i:i + 1],
                      T.cache_mask(key_valid, i, 1), cache, jnp.int32(i))
    outs.append(out)
  dec = np.asarray(jnp.concatenate(outs, 1))
  # Padding queries have no valid keys: only valid slots are compared.
  np.testing.assert_allclose(dec[valid], np.asarray(full)[valid], rtol=1e-5,
                             atol=1e-5)
  # Token by token from slot 0 gives the same.
  cache = model.init_cache(b, t)
  outs = []
  for i in range(t):
    out, cache = step(model, x[:, i:i + 1], positions[:, i:i + 1],
                      T.cache_mask(key_valid, i, 1), cache, jnp.int32(i))
    outs.append(out)
  dec1 = np.asarray(jnp.concatenate(outs, 1))
  np.testing.assert_allclose(dec1[valid], np.asarray(full)[valid], rtol=1e-5,
                             atol=1e-5)
  # The padding really is ignored: row 0 without its 3 padding slots (moved
  # to the end, where causality hides them) gives the same outputs; and rope
  # makes row 2 invariant to its constant position shift of 40.
  x2 = jnp.stack([jnp.roll(x[0], -3, axis=0), x[2]])
  pos2 = jnp.stack([jnp.roll(positions[0], -3), positions[2] - 40])
  valid2 = jnp.asarray([np.roll(valid[0], -3), valid[2]])
  other, _ = forward(model, x2, pos2, T.causal_mask(valid2))
  np.testing.assert_allclose(np.asarray(other)[0, :t - 3],
                             np.asarray(full)[0, 3:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(other)[1], np.asarray(full)[2],
                             rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------- remat
def test_remat_policies_give_the_same_loss_and_grads():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  mask = T.causal_mask(jnp.ones((2, 6), bool))

  def loss(m):
    out, _ = m(x, pos, mask)
    return jnp.sum(out * w)

  results = {}
  for remat in ('none', 'full', 'dots'):
    m = _make(_config(remat=remat), seed=7)
    fn = nnx.value_and_grad(loss)
    jaxpr = str(jax.make_jaxpr(lambda m: fn(m))(m))
    # The policy is wired: remat'd variants have a checkpoint in their graph.
    has_remat = 'checkpoint' in jaxpr or 'remat' in jaxpr
    assert has_remat == (remat != 'none'), remat
    value, grads = nnx.jit(fn)(m)
    results[remat] = (float(value), jax.tree.map(np.asarray,
                                                 nnx.to_pure_dict(grads)))
  v0, g0 = results['none']
  assert np.isfinite(v0) and max(float(np.abs(g).max())
                                 for g in jax.tree.leaves(g0)) > 0
  for remat in ('full', 'dots'):
    v, g = results[remat]
    assert v == pytest.approx(v0, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-6), g, g0)


# ------------------------------------------------------------ config errors
def test_check_config_errors_name_the_key():
  T.check_config(_config(), 'model.backbone')  # fine as is
  with pytest.raises(ConfigError, match=r'config\.model\.backbone\.num_heads=6 '
                     r'must be a multiple of num_kv_heads=4'):
    T.check_config(_config(num_heads=6, num_kv_heads=4, head_dim=4),
                   'model.backbone')
  with pytest.raises(ConfigError, match=r'config\.model\.local: head_dim 3 '
                     r'must be even'):
    T.check_config(_config(dim=12, num_heads=4, num_kv_heads=2), 'model.local')
  with pytest.raises(ConfigError, match=r'config\.model\.local: head_dim 5'):
    T.check_config(_config(head_dim=5), 'model.local')
  with pytest.raises(ConfigError, match=r'config\.x\.dim=30 is not divisible '
                     r'by num_heads=4'):
    T.check_config(_config(dim=30), 'x')
  with pytest.raises(ConfigError, match=r"config\.x\.remat must be"):
    T.check_config(_config(remat='some'), 'x')


def test_lm_task_reports_transformer_errors_by_full_key():
  c = F.small_config()
  c.model.local.num_heads, c.model.local.num_kv_heads = 3, 2
  with pytest.raises(ConfigError, match=r'config\.model\.local\.num_heads=3'):
    tasks.get('lm')(c)
  c = F.small_config()
  c.model.backbone.head_dim = 7
  with pytest.raises(ConfigError, match=r'config\.model\.backbone: head_dim 7 '
                     r'must be even'):
    tasks.get('lm')(c)


def test_swiglu_mlp_hand_written_backward_matches_autodiff():
  from musicjax.nn.transformer import swiglu_mlp
  ks = jax.random.split(jax.random.key(7), 4)
  x = jax.random.normal(ks[0], (37, 16))
  g = 0.3 * jax.random.normal(ks[1], (16, 24))
  u = 0.3 * jax.random.normal(ks[2], (16, 24))
  d = 0.3 * jax.random.normal(ks[3], (24, 16))
  plain = lambda x, g, u, d: (jax.nn.silu(x @ g) * (x @ u)) @ d
  loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))
  np.testing.assert_allclose(swiglu_mlp(x, g, u, d), plain(x, g, u, d), rtol=1e-6)
  got = jax.grad(loss(swiglu_mlp), argnums=(0, 1, 2, 3))(x, g, u, d)
  want = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(x, g, u, d)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mask_kind', ['keys', 'causal'])
def test_query_blocked_attention_equals_full_attention(mask_kind):
  """attention_chunk only changes memory: outputs and gradients are those of
  the full [T, T] attention, also when T is not a multiple of the block."""
  rng = np.random.default_rng(0)
  b, t, h, kv, d = 2, 37, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, kv, t, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, kv, t, d)), jnp.float32)
  valid = jnp.asarray(np.arange(t)[None] < np.array([[t], [29]]))
  mask = T.causal_mask(valid, causal=mask_kind == 'causal')
  full = T.attend(q, k, v, mask)
  for chunk in (8, 16, 64):
    np.testing.assert_allclose(T.attend(q, k, v, mask, chunk), full,
                               rtol=1e-5, atol=1e-6)
  loss = lambda q, k, v, c: jnp.sum(jnp.sin(T.attend(q, k, v, mask, c)))
  g_full = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 0)
  g_blk = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 8)
  for a, c in zip(g_blk, g_full):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
