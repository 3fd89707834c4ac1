"""Codebook interleaving patterns: layout, round trip, jit, decode-loop use."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicjax.lm import patterns as P

SPECIAL = -7
SHAPES = [(1, 1), (1, 5), (2, 3), (3, 4), (4, 7), (8, 2)]  # (K, T)


def _codes(b, t, k, seed=0, vocab=50):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, vocab, (b, t, k)), jnp.int32)


@pytest.mark.parametrize('kind', P.KINDS)
@pytest.mark.parametrize('k,t', SHAPES)
@pytest.mark.parametrize('b', [2, 3])
def test_build_revert_round_trip(kind, k, t, b):
  p = P.make_pattern(kind, k, t)
  codes = np.asarray(_codes(b, t, k, seed=k * 100 + t))

  @jax.jit  # one compile per case instead of one per eager op
  def round_trip(codes):
    seq, valid = P.build(p, codes, SPECIAL)
    return seq, valid, *P.revert(p, seq)

  seq, valid, back, mask = round_trip(codes)
  assert seq.shape == (b, P.num_steps(kind, k, t), k)
  assert valid.shape == seq.shape[1:]
  # Empty slots, and only those, hold the special token (codes are >= 0).
  np.testing.assert_array_equal(np.asarray(seq) == SPECIAL,
                                np.broadcast_to(~np.asarray(valid), seq.shape))
  np.testing.assert_array_equal(np.asarray(back), codes)
  assert mask.shape == (t, k) and bool(mask.all())


def test_delay_layout_by_hand():
  p = P.make_pattern('delay', 3, 4)
  codes = jnp.asarray([[[10, 20, 30], [11, 21, 31], [12, 22, 32],
                        [13, 23, 33]]])
  seq, valid = P.build(p, codes, -1)
  expected = np.asarray([[10, -1, -1],
                         [11, 20, -1],
                         [12, 21, 30],
                         [13, 22, 31],
                         [-1, 23, 32],
                         [-1, -1, 33]])
  np.testing.assert_array_equal(np.asarray(seq[0]), expected)
  np.testing.assert_array_equal(np.asarray(valid), expected != -1)
  np.testing.assert_array_equal(np.asarray(P.loss_mask(p)), expected != -1)


def test_custom_delays_and_parallel_is_zero_delay():
  codes = _codes(2, 5, 3, seed=3)
  seq, _ = P.build(P.make_pattern('delay', 3, 5, delays=(0, 2, 1)), codes, -1)
  assert seq.shape == (2, 7, 3)
  np.testing.assert_array_equal(np.asarray(seq[:, 2:, 1]),
                                np.asarray(codes[:, :, 1]))
  np.testing.assert_array_equal(np.asarray(seq[:, 1:6, 2]),
                                np.asarray(codes[:, :, 2]))
  zero, _ = P.build(P.make_pattern('delay', 3, 5, delays=(0, 0, 0)), codes, -1)
  par, valid = P.build(P.make_pattern('parallel', 3, 5), codes, -1)
  np.testing.assert_array_equal(np.asarray(par), np.asarray(codes))
  np.testing.assert_array_equal(np.asarray(zero), np.asarray(par))
  assert bool(valid.all())


def test_flatten_one_codebook_per_step():
  k, t = 3, 4
  p = P.make_pattern('flatten', k, t)
  codes = _codes(2, t, k, seed=5)
  seq, valid = P.build(p, codes, SPECIAL)
  assert seq.shape == (2, t * k, k) == (2, P.num_steps('flatten', k, t), k)
  np.testing.assert_array_equal(np.asarray(valid).sum(-1), np.ones(t * k))
  for s in range(t * k):
    assert bool(valid[s, s % k])
    np.testing.assert_array_equal(np.asarray(seq[:, s, s % k]),
                                  np.asarray(codes[:, s // k, s % k]))


@pytest.mark.parametrize('kind', P.KINDS)
def test_single_codebook_is_plain_sequence(kind):
  codes = _codes(2, 6, 1, seed=7)
  seq, valid = P.build(P.make_pattern(kind, 1, 6), codes, SPECIAL)
  assert P.num_steps(kind, 1, 6) == 6
  np.testing.assert_array_equal(np.asarray(seq), np.asarray(codes))
  assert bool(valid.all())


@pytest.mark.parametrize('kind', P.KINDS)
def test_revert_logits_matches_manual_gather(kind):
  k, t, v, b = 3, 5, 4, 2
  p = P.make_pattern(kind, k, t)
  logits = jax.random.normal(jax.random.key(1), (b, p.num_steps, k, v))
  out, mask = P.revert(p, logits)
  assert out.shape == (b, t, k, v)
  expected = np.zeros((b, t, k, v), np.float32)
  filled = np.zeros((t, k), bool)
  lg = np.asarray(logits)
  for s in range(p.num_steps):
    for kk in range(k):
      if p.valid[s, kk]:
        expected[:, p.frame_index[s, kk], kk] = lg[:, s, kk]
        filled[p.frame_index[s, kk], kk] = True
  np.testing.assert_array_equal(np.asarray(out), expected)
  np.testing.assert_array_equal(np.asarray(mask), filled)


def test_revert_mask_marks_unfilled_frames():
  # No pattern kind leaves a hole, so hand-craft one: drop frame 1 codebook 0.
  p = P.make_pattern('parallel', 2, 3)
  step_index = p.step_index.copy()
  step_index[1, 0] = -1
  holed = P.Pattern(p.kind, p.num_codebooks, p.num_frames, p.delays,
                    p.frame_index, p.valid, step_index)
  out, mask = P.revert(holed, jnp.ones((1, 3, 2), jnp.int32))
  np.testing.assert_array_equal(np.asarray(mask),
                                [[True, True], [False, True], [True, True]])
  np.testing.assert_array_equal(np.asarray(out[0]), [[1, 1], [0, 1], [1, 1]])


@pytest.mark.parametrize('kind', P.KINDS)
def test_under_jit_static_pattern(kind):
  p = P.make_pattern(kind, 3, 4)
  assert p == P.make_pattern(kind, 3, 4) and hash(p) == hash(
      P.make_pattern(kind, 3, 4))

  @functools.partial(jax.jit, static_argnums=0)
  def round_trip(pattern, codes, special):
    seq, valid = P.build(pattern, codes, special)
    back, mask = P.revert(pattern, seq)
    return seq, valid, back, mask, P.loss_mask(pattern)

  codes = _codes(3, 4, 3, seed=11)
  seq, valid, back, mask, lm = round_trip(p, codes, jnp.int32(SPECIAL))
  ref_seq, ref_valid = P.build(p, codes, SPECIAL)
  np.testing.assert_array_equal(np.asarray(seq), np.asarray(ref_seq))
  np.testing.assert_array_equal(np.asarray(valid), np.asarray(ref_valid))
  np.testing.assert_array_equal(np.asarray(lm), np.asarray(ref_valid))
  np.testing.assert_array_equal(np.asarray(back), np.asarray(codes))
  assert bool(mask.all())


@pytest.mark.parametrize('kind,delays', [('delay', None), ('delay', (1, 0, 3)),
                                         ('parallel', None),
                                         ('flatten', None)])
def test_decode_loop_with_traced_step(kind, delays):
  k, t, b = 3, 5, 2
  p = P.make_pattern(kind, k, t, delays)
  codes = _codes(b, t, k, seed=13)
  seq, _ = P.build(p, codes, SPECIAL)

  @jax.jit
  def decode(seq):
    def body(s, carry):
      manual, helper = carry
      tokens = jax.lax.dynamic_index_in_dim(seq, s, axis=1, keepdims=False)
      frame, valid = P.step_slots(p, s)
      # Masked scatter: invalid slots point past the grid and are dropped.
      manual = manual.at[:, jnp.where(valid, frame, t), jnp.arange(k)].set(
          tokens, mode='drop')
      return manual, P.write_step(p, helper, s, tokens)

    start = jnp.full((b, t, k), -1, jnp.int32)
    return jax.lax.fori_loop(0, p.num_steps, body, (start, start))

  manual, helper = decode(seq)
  np.testing.assert_array_equal(np.asarray(manual), np.asarray(codes))
  np.testing.assert_array_equal(np.asarray(helper), np.asarray(codes))


def test_step_slots_values_and_out_of_range_traced_step():
  p = P.make_pattern('delay', 3, 4)
  frame, valid = P.step_slots(p, 1)
  np.testing.assert_array_equal(np.asarray(frame), [1, 0, -1])
  np.testing.assert_array_equal(np.asarray(valid), [True, True, False])
  slots = jax.jit(lambda s: P.step_slots(p, s))
  for s in (-1, p.num_steps):
    frame, valid = slots(jnp.int32(s))
    assert not bool(valid.any()) and bool((frame == -1).all())


@pytest.mark.parametrize('kind,delays', [('delay', None), ('delay', (2, 0, 5)),
                                         ('parallel', None),
                                         ('flatten', None)])
def test_frames_for_steps_inverts_num_steps(kind, delays):
  k = 3
  for t in range(1, 9):
    s = P.num_steps(kind, k, t, delays)
    assert P.frames_for_steps(kind, k, s, delays) == t
    assert P.frames_for_steps(kind, k, s - 1, delays) == t - 1
    # Consistent with the tables: frames complete after s steps are exactly
    # those whose every codebook sits at a step < s.
    p = P.make_pattern(kind, k, t, delays)
    for done in range(s + 1):
      complete = (p.step_index < done).all(-1)
      expected = int(np.argmin(complete)) if not complete.all() else t
      assert P.frames_for_steps(kind, k, done, delays) == expected
  assert P.frames_for_steps(kind, k, 0, delays) == 0


@pytest.mark.parametrize('call,arg', [
    (lambda: P.make_pattern('interleave', 2, 3), 'kind'),
    (lambda: P.make_pattern('delay', 0, 3), 'num_codebooks'),
    (lambda: P.make_pattern('delay', 2, 0), 'num_frames'),
    (lambda: P.make_pattern('delay', 2.0, 3), 'num_codebooks'),
    (lambda: P.make_pattern('delay', 2, 3, delays=(0,)), 'delays'),
    (lambda: P.make_pattern('delay', 2, 3, delays=(0, -1)), 'delays'),
    (lambda: P.make_pattern('delay', 2, 3, delays=(0, 1.5)), 'delays'),
    (lambda: P.make_pattern('flatten', 2, 3, delays=(0, 1)), 'delays'),
    (lambda: P.num_steps('delay', 2, -1), 'num_frames'),
    (lambda: P.frames_for_steps('flatten', 2, -1), 'steps'),
    (lambda: P.step_slots(P.make_pattern('delay', 2, 3), 4), 'step'),
    (lambda: P.build(P.make_pattern('delay', 2, 3), jnp.zeros((1, 3, 4)), 0),
     'codes'),
    (lambda: P.revert(P.make_pattern('delay', 2, 3), jnp.zeros((1, 3, 2))),
     'values'),
])
def test_bad_arguments_raise(call, arg):
  with pytest.raises(ValueError, match=arg):
    call()


def test_kind_error_lists_choices():
  with pytest.raises(ValueError) as e:
    P.make_pattern('interleave', 2, 3)
  for kind in P.KINDS:
    assert kind in str(e.value)
