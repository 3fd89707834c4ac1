"""Masked-diffusion maths for accompaniment tokens: schedules, losses, sampler."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicjax.accomp import diffusion as D


def test_cosine_mask_ratio_endpoints():
  t = np.asarray(D.cosine_mask_ratio(jnp.array([0.0, 0.5, 1.0]), eps=1e-6))
  np.testing.assert_allclose(t, [1.0, np.cos(np.pi / 4), 1e-6], rtol=1e-5)
  with pytest.raises(ValueError, match='eps'):
    D.cosine_mask_ratio(jnp.zeros(2), eps=0.0)


def test_bit_reverse_is_van_der_corput():
  n = np.array([0, 1, 2, 3, 6, 12345, 2**32 - 1], np.uint64)
  want = [int(format(int(x), '032b')[::-1], 2) for x in n]
  got = D._bit_reverse_u32(jnp.asarray(n.astype(np.uint32)))
  np.testing.assert_array_equal(np.asarray(got).astype(np.uint64), want)


def test_sobol_r_deterministic_range_low_discrepancy():
  f = jax.jit(D.sobol_r, static_argnums=1)
  a = np.asarray(f(7, 64, 3))
  np.testing.assert_array_equal(a, np.asarray(D.sobol_r(7, 64, 3)))
  assert a.shape == (64,) and a.min() >= 0 and a.max() < 1
  for step in (0, 1, 7, 1000):
    counts = np.histogram(np.asarray(f(step, 64, 3)), bins=8, range=(0, 1))[0]
    assert np.all(np.abs(counts - 8) <= 2), counts
  # An i.i.d. uniform batch is much less even on average.
  iid = np.random.default_rng(0).uniform(size=(200, 64))
  iid_dev = np.mean([np.abs(np.histogram(x, 8, (0, 1))[0] - 8).max()
                     for x in iid])
  assert iid_dev > 2
  assert not np.allclose(a, np.asarray(f(7, 64, 4)))
  assert not np.allclose(a, np.asarray(f(8, 64, 3)))
  # Consecutive steps continue one sequence: two steps of 32 = one of 64.
  both = np.concatenate([np.asarray(f(2, 32, 3)), np.asarray(f(3, 32, 3))])
  np.testing.assert_array_equal(both, np.asarray(f(1, 64, 3)))
  with pytest.raises(ValueError, match='batch'):
    D.sobol_r(0, 0, 3)


def test_mask_tokens_rate_and_validity():
  b, n = 4, 20000
  valid = jnp.asarray(np.random.default_rng(1).uniform(size=(b, n)) < 0.7)
  t = jnp.array([0.1, 0.5, 0.9, 1.0])
  m = np.asarray(jax.jit(D.mask_tokens)(jax.random.key(0), valid, t))
  v = np.asarray(valid)
  assert not np.any(m & ~v)
  rate = (m & v).sum(1) / v.sum(1)
  np.testing.assert_allclose(rate, np.asarray(t), atol=0.015)
  m3 = D.mask_tokens(jax.random.key(1), jnp.ones((2, 5, 3), bool),
                     jnp.array([0.0, 1.0]))
  assert m3.shape == (2, 5, 3)
  assert not np.any(np.asarray(m3[0])) and np.all(np.asarray(m3[1]))


def test_loss_weights_values():
  t = jnp.array([0.5, 0.9, 0.99])
  np.testing.assert_allclose(D.loss_weights(t, 'elbo'), [2.72, 0.76, 0.22],
                             atol=0.006)
  np.testing.assert_allclose(D.loss_weights(t, 'inv_t'), 1 / np.asarray(t),
                             rtol=1e-6)
  np.testing.assert_array_equal(D.loss_weights(t, 'none'), np.ones(3))
  with pytest.raises(ValueError, match='kind'):
    D.loss_weights(t, 'linear')


def test_elbo_weight_times_t_integrates_to_one():
  # E_r[w(t(r)) t(r)] = 1: a uniform model's NELBO is log V per token.
  r = (np.arange(100000) + 0.5) / 100000
  t = D.cosine_mask_ratio(jnp.asarray(r))
  np.testing.assert_allclose(np.mean(np.asarray(D.loss_weights(t, 'elbo') * t)),
                             1.0, rtol=1e-3)
  # ...and via the training sampler (quasi Monte Carlo).
  t = D.cosine_mask_ratio(D.sobol_r(0, 4096, 5))
  np.testing.assert_allclose(np.mean(np.asarray(D.loss_weights(t, 'elbo') * t)),
                             1.0, rtol=1e-2)


@pytest.mark.parametrize('kind', D.LOSS_KINDS)
def test_masked_ce_loss_matches_hand_computation(kind):
  rng = np.random.default_rng(2)
  b, n, v = 3, 6, 5
  logits = rng.normal(size=(b, n, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, n))
  valid = np.ones((b, n), bool)
  valid[2, 4:] = False
  mask = rng.uniform(size=(b, n)) < 0.5
  mask[0, 0] = True
  mask &= valid
  t = np.array([0.3, 0.6, 0.95], np.float32)
  loss, metrics = jax.jit(D.masked_ce_loss, static_argnames='kind')(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
      jnp.asarray(t), jnp.asarray(valid), kind=kind)
  lse = np.log(np.exp(logits).sum(-1))
  ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  if kind == 'none':
    want = ce[mask].mean()
  else:
    w = 1 / t if kind == 'inv_t' else np.pi / 2 * np.sqrt(1 - t**2) / t
    want = (w[:, None] * ce * mask).sum() / valid.sum()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['ce_masked']), ce[mask].mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics['masked_fraction']),
                             mask.sum() / valid.sum(), rtol=1e-6)


def test_masked_ce_loss_codebook_axis_and_shape_errors():
  logits = jnp.zeros((2, 3, 4, 7))
  targets = jnp.zeros((2, 3, 4), jnp.int32)
  ones = jnp.ones((2, 3, 4), bool)
  loss, _ = D.masked_ce_loss(logits, targets, ones, jnp.ones(2), ones)
  np.testing.assert_allclose(float(loss), np.log(7), rtol=1e-6)
  with pytest.raises(ValueError, match='mask'):
    D.masked_ce_loss(logits, targets, ones[:, :2], jnp.ones(2), ones)


def test_rtd_inputs_and_loss():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 50, 4)).astype(np.float32)
  targets = rng.integers(0, 4, size=(2, 50))
  mask = rng.uniform(size=(2, 50)) < 0.5
  replaced, labels = jax.jit(D.rtd_inputs)(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  pred = logits.argmax(-1)
  np.testing.assert_array_equal(replaced, np.where(mask, pred, targets))
  np.testing.assert_array_equal(labels, mask & (pred != targets))
  assert np.asarray(labels).any() and (mask & (pred == targets)).any()

  x = rng.normal(size=(2, 50)).astype(np.float32) * 5
  valid = rng.uniform(size=(2, 50)) < 0.8
  y = np.asarray(labels).astype(np.float64)
  p = 1 / (1 + np.exp(-x.astype(np.float64)))
  bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  got = jax.jit(D.rtd_loss)(jnp.asarray(x), labels, jnp.asarray(valid))
  np.testing.assert_allclose(float(got), bce[valid].mean(), rtol=1e-5)


def test_num_masked_after_schedule():
  steps, total = 60, 750
  f = jax.jit(D.num_masked_after, static_argnums=1)
  n_masked = jnp.array([total, total])
  counts = [total]
  for step in range(steps):
    n = f(step, steps, jnp.array([total, total]), n_masked)
    assert n[0] == n[1]
    assert int(n[0]) <= counts[-1] - 1          # >= 1 committed per step
    counts.append(int(n[0]))
    n_masked = n
  assert counts[-1] == 0 and counts[-2] > 0
  unmasked = -np.diff(counts)
  assert list(unmasked[:4]) == [1, 1, 1, 2]     # the note's 30 s example
  assert 15 <= unmasked[-2] <= 25
  # A row with one masked token waits; it is never asked for more than it has.
  n = D.num_masked_after(3, steps, jnp.array([750, 750]), jnp.array([1, 0]))
  np.testing.assert_array_equal(n, [1, 0])


def test_num_masked_after_counts_as_the_released_sampler_hand_cases():
  """Two counts checked by hand.

  80 tokens, step 39 of 60: progress 40/60 = 2/3 and cos(pi/3) = 1/2 exactly,
  so 40 stay masked. The released code's float64 ratio is 0.5000000000000001
  (product 40.000000000000007 -> 40); the old float32 schedule had
  cos(40 * float32(pi/120)) = 0.49999997 -> 39.999998 -> 39.

  2911 tokens, step 0 of 3: cos(pi/6) = 0.8660254037844387 and the float64
  product is 2520.99995041650...; made float32 (gap 2^-12 = 0.000244 between
  2048 and 4096) it rounds to 2521.0, which the released code floors to 2521
  (a pure float64 floor would give 2520).
  """
  f = jax.jit(D.num_masked_after, static_argnums=1)
  assert int(f(39, 60, jnp.array([80]), jnp.array([81]))[0]) == 40
  assert int(f(0, 3, jnp.array([2911]), jnp.array([3000]))[0]) == 2521


def _released_counts(steps: int, totals: np.ndarray) -> np.ndarray:
  """[steps - 1, len(totals)]: LaDA-Band's count before clipping, as its
  sampler computes it: Python-float ratio cos(progress * pi / 2), times the
  token count in float64, made a float32 tensor, floored."""
  r = np.array([math.cos((i + 1) / steps * math.pi / 2.0)
                for i in range(steps - 1)])
  product = r[:, None] * totals[None].astype(np.float64)
  return np.floor(product.astype(np.float32)).astype(np.int64)


def test_schedule_counts_are_exact_for_every_total_and_step_count():
  """The device count (exact int32 arithmetic) equals the float64 reference
  for every total in [0, 4096] and every step but the last (which leaves
  none) of 2..128 steps (33.8M counts; 1890 of them differ from a plain
  float64 floor, 18274 from a floor of numpy's cos(pi/2 * (i+1)/steps)), and
  for totals up to MAX_SCHEDULE_TOTAL."""
  max_steps, totals = 128, np.arange(4097)
  count = jax.jit(D._floor_like_released)
  for steps in range(2, max_steps + 1):
    # Padded to one shape, so that this compiles once.
    digits = np.zeros((max_steps, D._R_DIGITS), np.int32)
    digits[:steps] = D._ratio_digits(steps)
    got = np.asarray(count(jnp.asarray(digits)[:, None],
                           jnp.asarray(totals)[None]))
    want = _released_counts(steps, totals)
    bad = np.argwhere(got[:steps - 1] != want)
    assert not len(bad), (steps, bad[:5])
  big = np.array([0, 1, 2**22 - 1, 2**22, 2**22 + 1, 5_000_000,
                  D.MAX_SCHEDULE_TOTAL])
  for steps in (2, 3, 60, 128):
    digits = D._ratio_digits(steps)[:-1]
    got = np.asarray(count(jnp.asarray(digits)[:, None],
                           jnp.asarray(big)[None]))
    np.testing.assert_array_equal(got, _released_counts(steps, big))


def test_gumbel_scale():
  np.testing.assert_allclose(
      [float(D.gumbel_scale(s, 60)) for s in (0, 29, 59)],
      [10.5 * 59 / 60, 5.25, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match='steps'):
    D.gumbel_scale(0, 0)


def test_remask_keeps_n_lowest_and_never_committed():
  rng = np.random.default_rng(4)
  b, n = 4, 32
  conf = rng.uniform(0.01, 1.0, size=(b, n)).astype(np.float32)
  still = rng.uniform(size=(b, n)) < 0.6
  keep = np.array([0, 3, 5, int(still[3].sum())])
  f = jax.jit(D.remask)
  new = np.asarray(f(jax.random.key(0), jnp.asarray(conf), jnp.asarray(still),
                     jnp.asarray(keep), 0.0))
  for i in range(b):
    assert new[i].sum() == keep[i]
    assert not np.any(new[i] & ~still[i])
    idx = np.flatnonzero(still[i])
    lowest = idx[np.argsort(conf[i, idx])[:keep[i]]]
    assert set(np.flatnonzero(new[i])) == set(lowest)
  # With noise the choice changes but the invariants hold; ties keep exactly n.
  new = np.asarray(f(jax.random.key(1), jnp.ones((b, n)), jnp.asarray(still),
                     jnp.asarray(keep), 10.0))
  assert np.array_equal(new.sum(1), keep) and not np.any(new & ~still)
  tied = np.asarray(f(jax.random.key(1), jnp.ones((b, n)), jnp.asarray(still),
                      jnp.asarray(keep), 0.0))
  assert np.array_equal(tied.sum(1), keep) and not np.any(tied & ~still)


def test_filter_logits_top_p_then_top_k():
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.07, 0.03]]))
  f = jax.jit(D.filter_logits, static_argnums=(1, 2))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(f(logits, 0, 1.0)) == [True] * 5
  assert kept(f(logits, 2, 1.0)) == [True, True, False, False, False]
  # Mass before token 3 is 0.9 >= 0.85: top-p keeps 3 tokens.
  assert kept(f(logits, 0, 0.85)) == [True, True, True, False, False]
  assert kept(f(logits, 4, 0.85)) == [True, True, True, False, False]
  assert kept(f(logits, 1, 0.85)) == [True, False, False, False, False]
  np.testing.assert_allclose(np.asarray(f(logits, 2, 1.0))[0, :2],
                             np.asarray(logits)[0, :2])
  with pytest.raises(ValueError, match='top_p'):
    D.filter_logits(logits, 0, 0.0)


def _filter_reference(row, top_k, top_p):
  """Sort-based top-p then top-k (numpy, one row)."""
  order = np.argsort(-row, kind='stable')
  srt = row[order]
  p = np.exp(srt - srt.max())
  p /= p.sum()
  before = np.cumsum(p) - p
  keep = before < top_p
  if top_k:
    keep &= np.arange(len(row)) < top_k
  cut = srt[keep].min()
  return row >= cut


@pytest.mark.parametrize('top_k,top_p', [(100, 0.9), (7, 1.0), (0, 0.5),
                                         (3, 0.99), (1, 0.9)])
def test_filter_logits_equals_a_sort_on_random_rows_with_ties(top_k, top_p):
  rng = np.random.default_rng(top_k)
  rows = rng.normal(0, 3, (64, 256)).astype(np.float32)
  rows[::4] = np.round(rows[::4])          # many exact ties
  rows[1::8, :50] = -np.inf                # impossible tokens
  got = np.isfinite(np.asarray(D.filter_logits(jnp.asarray(rows), top_k, top_p)))
  for i in range(len(rows)):
    np.testing.assert_array_equal(got[i], _filter_reference(rows[i], top_k, top_p),
                                  err_msg=f'row {i}')
