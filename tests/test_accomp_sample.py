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


def test_temperature_after_filter_follows_the_released_order():
  """probs (0.5, 0.3, 0.2), top_p 0.75, temperature 2, no top-k.

  After the cut (released code): the nucleus of the raw probs keeps tokens 0
  and 1 (mass before token 2 is 0.8 >= 0.75); temperature 2 then gives
  sqrt(.5) : sqrt(.3) = 0.7071 : 0.5477 -> (0.5635, 0.4365, 0).
  Before the cut: temperature 2 first gives sqrt(.5, .3, .2) / 1.7020 =
  (0.4155, 0.3218, 0.2628); the mass before token 2 is 0.7373 < 0.75, so all
  three stay.
  """
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  after = S.Sampling(temperature=2.0, top_k=0, top_p=0.75)
  assert after.temperature_after_filter      # the default: the paper's code
  before = S.Sampling(temperature=2.0, top_k=0, top_p=0.75,
                      temperature_after_filter=False)
  np.testing.assert_allclose(jax.nn.softmax(S.token_logits(logits, after))[0],
                             [0.5635, 0.4365, 0.0], atol=1e-4)
  np.testing.assert_allclose(jax.nn.softmax(S.token_logits(logits, before))[0],
                             [0.4155, 0.3218, 0.2628], atol=1e-4)
  # At temperature 1 the two orders are the same.
  one = dict(temperature=1.0, top_k=2, top_p=0.75)
  np.testing.assert_array_equal(
      S.token_logits(logits, S.Sampling(**one)),
      S.token_logits(logits, S.Sampling(**one, temperature_after_filter=False)))
