"""The one-loop masked-diffusion sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicjax.accomp import model as M
from musicjax.accomp import sample as S
import test_accomp_model as T


def _prefix(m, x, use=True):
  b = x['vocal'].shape[0]
  flag = jnp.full((b,), use)
  return m.prefix(x['text_ids'], x['text_valid'], x['ref_codes'], x['ref_valid'],
                  flag, flag)


@pytest.mark.parametrize('k', [1, 2])
def test_every_valid_token_is_committed_and_pads_stay(k):
  m, x = T._make(k), T._inputs(k, t=8)
  valid = x['valid'].at[1, 6:].set(False)
  run = jax.jit(lambda v, va, p, r: S.accompany(m, v, va, p, r, S.Sampling(steps=6)))
  out = np.asarray(run(x['vocal'], valid, _prefix(m, x), jax.random.key(0)))
  assert out.shape == (2, 8, k)
  ok = np.asarray(valid)[..., None].repeat(k, -1)
  assert (out[ok] < 16).all()                       # real codes, no MASK left
  assert (out[~ok] == M.pad_id(16)).all()


def test_same_seed_same_tokens_and_different_seed_differs():
  m, x = T._make(1), T._inputs(1, t=8)
  p = _prefix(m, x)
  s = S.Sampling(steps=5, top_k=0, top_p=1.0)
  a = S.accompany(m, x['vocal'], x['valid'], p, jax.random.key(3), s)
  b = S.accompany(m, x['vocal'], x['valid'], p, jax.random.key(3), s)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = S.accompany(m, x['vocal'], x['valid'], p, jax.random.key(4), s)
  assert (np.asarray(a) != np.asarray(c)).any()


def test_committed_tokens_stay_and_masks_shrink_on_schedule():
  m, x = T._make(2), T._inputs(2, t=10)
  steps = 6
  out, states = S.accompany(m, x['vocal'], x['valid'], _prefix(m, x),
                            jax.random.key(0), S.Sampling(steps=steps), trace=True)
  states = np.asarray(states)
  mask_tok = M.mask_id(16)
  prev = np.full(states.shape[1:], mask_tok)
  counts = []
  for st in states:
    committed = prev != mask_tok
    np.testing.assert_array_equal(st[committed], prev[committed])
    counts.append(int((st == mask_tok).sum()))
    prev = st
  assert counts[-1] == 0
  assert all(a > b for a, b in zip([2 * 10 * 2] + counts, counts))  # >= 1 per step per row
  np.testing.assert_array_equal(states[-1], np.asarray(out))


def test_cfg_scale_one_equals_conditional_and_other_scales_differ():
  m, x = T._make(1), T._inputs(1, t=6)
  p = _prefix(m, x)
  null = _prefix(m, x, use=False)
  r = jax.random.key(1)
  plain = S.accompany(m, x['vocal'], x['valid'], p, r, S.Sampling(steps=4))
  # Guidance with scale 1: the batch is doubled with null-prefix rows, and
  # u + 1 * (c - u) = c.
  guided = S.accompany(m, x['vocal'], x['valid'], p, r,
                       S.Sampling(steps=4, cfg_scale=1.0), null)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(guided))
  strong = S.accompany(m, x['vocal'], x['valid'], p, r,
                       S.Sampling(steps=4, cfg_scale=5.0), null)
  assert (np.asarray(strong) != np.asarray(plain)).any()
