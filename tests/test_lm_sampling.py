"""Sampling and the decode loop's control flow: top-k/top-p, classifier-free
guidance, seeds, END and min/max frames, streaming, interleaved sections.

Models are tiny random ones (lm_fixtures); one jitted `generate` serves every
test, so a (model structure, shapes, settings) combination compiles once.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lm_fixtures as F
from musicjax.lm import generate as G
from musicjax.lm import layout
from musicjax.lm import sequence
from musicjax.lm.data import audio_slots

VARIANTS = ('global_local', 'single_stream')
_generate = jax.jit(G.generate, static_argnames=(
    'sampling', 'num_cond', 'callback', 'record_logits'))


def _extra(c, token):
  return layout.extra_id(c.model.text_vocab_size, token)


def _prompts(c, rows, length):
  """Left-padded prompt rows of text ids, stacked: {name: [B, length, ...]}."""
  out = []
  for ids in rows:
    ex = sequence.assemble([sequence.TextPart(ids)], len(ids),
                           c.model.num_codebooks, c.model.codebook_size)
    out.append(sequence.left_pad(ex, length))
  return {k: jnp.asarray(np.stack([o[k] for o in out])) for k in out[0]}


def _rows(prompt, rows):
  return {k: v[np.asarray(rows)] for k, v in prompt.items()}


def _cond_and_null(c, seed=0):
  """A conditional prompt and the null-condition prompt, same length."""
  rng = np.random.default_rng(seed)
  cond = F.text_ids(c, 4, rng) + [F.audio_id(c)]
  null = [_extra(c, '<null_tags>'), _extra(c, '<null_lyrics>'), F.audio_id(c)]
  return _prompts(c, [cond, null], len(cond) + 1)


def _logit_keys(out):
  keys = sorted(k for k in out if k.startswith('logits'))
  assert keys
  return keys


def _steps_run(out):
  """Loop iterations that ran: recorded logits rows that are not all zero."""
  lg = np.asarray(out['logits_global'])[0]
  return int(np.sum(np.any(lg != 0, axis=-1)))


# ------------------------------------------------------------ sample_tokens


def _draws(logits, s, n=20000, seed=0):
  tiled = jnp.tile(jnp.asarray(logits, jnp.float32)[None], (n, 1))
  return np.asarray(G.sample_tokens(tiled, jax.random.key(seed), s))


def _assert_frequencies(draws, probs):
  """Pearson chi-square of the draws against `probs` (zero-probability
  classes must never be drawn); the bound is far in the tail of chi2(df)."""
  probs = np.asarray(probs, np.float64)
  counts = np.bincount(draws, minlength=len(probs))
  assert counts[probs == 0].sum() == 0, (counts, probs)
  live = probs > 0
  expected = len(draws) * probs[live]
  chi2 = float(np.sum((counts[live] - expected) ** 2 / expected))
  df = int(live.sum()) - 1
  assert chi2 < df + 8 * np.sqrt(2 * max(df, 1)) + 10, (chi2, df, counts, expected)


def _softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


def test_temperature_zero_and_top_k_one_are_argmax():
  logits = 3.0 * jax.random.normal(jax.random.key(3), (64, 20))
  best = np.argmax(np.asarray(logits), axis=-1)
  for seed in range(3):
    key = jax.random.key(seed)
    greedy = G.sample_tokens(logits, key, G.Sampling(temperature=0.0))
    np.testing.assert_array_equal(greedy, best)
    top1 = G.sample_tokens(logits, key, G.Sampling(temperature=2.0, top_k=1))
    np.testing.assert_array_equal(top1, best)
  # Sanity: plain sampling of the same logits does not always give argmax.
  plain = G.sample_tokens(logits, jax.random.key(0),
                          G.Sampling(temperature=2.0, top_k=0))
  assert np.any(np.asarray(plain) != best)


def test_top_k_draws_only_the_k_largest_with_renormalised_softmax():
  logits = np.random.default_rng(1).normal(size=20) * 1.5
  k, temp = 5, 1.7
  draws = _draws(logits, G.Sampling(temperature=temp, top_k=k))
  top = np.argsort(-logits)[:k]
  assert set(np.unique(draws)) == set(top)
  probs = np.zeros(20)
  probs[top] = _softmax(logits[top] / temp)
  _assert_frequencies(draws, probs)


def test_top_k_keeps_tokens_tied_with_the_kth_as_heartlib():
  """logits (2, 1, 1, 1, 0), top_k 2, temperature 1.

  heartlib drops only logits < the 2nd largest (1), so tokens 0..3 stay:
  p = (e^2, e, e, e) / (e^2 + 3e) = (e, 1, 1, 1) / (e + 3)
    = (0.4754, 0.1749, 0.1749, 0.1749, 0). Exactly k (top_k_keep_ties False,
  the old rule) keeps tokens 0 and 1 (ties go to the lower id):
  (e, 1) / (e + 1) = (0.7311, 0.2689, 0, 0, 0).
  """
  logits = np.array([2.0, 1.0, 1.0, 1.0, 0.0])
  e = np.e
  ties = _draws(logits, G.Sampling(temperature=1.0, top_k=2))
  assert G.Sampling().top_k_keep_ties                    # the default
  _assert_frequencies(ties, [e / (e + 3), 1 / (e + 3), 1 / (e + 3),
                             1 / (e + 3), 0.0])
  exact = _draws(logits, G.Sampling(temperature=1.0, top_k=2,
                                    top_k_keep_ties=False))
  _assert_frequencies(exact, [e / (e + 1), 1 / (e + 1), 0.0, 0.0, 0.0])


@pytest.mark.parametrize('top_p', [0.3, 0.6, 0.75, 0.97])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
  probs = np.array([0.1, 0.05, 0.45, 0.02, 0.25, 0.13])
  logits = np.log(probs)
  order = np.argsort(-probs)
  mass = np.cumsum(probs[order])
  n_keep = int(np.argmax(mass >= top_p)) + 1   # first prefix whose mass >= p
  kept = order[:n_keep]
  draws = _draws(logits, G.Sampling(temperature=1.0, top_k=0, top_p=top_p))
  assert set(np.unique(draws)) == set(kept)
  want = np.zeros_like(probs)
  want[kept] = probs[kept] / probs[kept].sum()
  _assert_frequencies(draws, want)


@pytest.mark.parametrize('temperature', [1.0, 0.6])
def test_full_categorical_draw_matches_softmax(temperature):
  logits = np.random.default_rng(2).normal(size=12) * 1.2
  draws = _draws(logits, G.Sampling(temperature=temperature, top_k=0))
  _assert_frequencies(draws, _softmax(logits / temperature))


def test_sampling_settings_are_validated():
  for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0),
              dict(top_p=1.5), dict(max_frames=0)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      G.Sampling(**bad).validate()


# ---------------------------------------------------------------------- CFG


@pytest.mark.parametrize('variant', VARIANTS)
def test_cfg_scale_one_equals_the_conditional_model(variant):
  c = F.small_config(variant=variant)
  m = F.make_model(c)
  both = _cond_and_null(c)
  s = G.Sampling(temperature=1.0, top_k=0, cfg_scale=1.0, max_frames=8,
                 min_frames=8)
  key = jax.random.key(5)
  guided = _generate(m, both, rng=key, sampling=s, num_cond=1,
                     record_logits=True)
  plain = _generate(m, _rows(both, [0]), rng=key, sampling=s, num_cond=1,
                    record_logits=True)
  assert guided['codes'].shape == plain['codes'].shape == (
      1, 8, c.model.num_codebooks)
  assert int(plain['num_frames'][0]) == 8
  np.testing.assert_array_equal(guided['num_frames'], plain['num_frames'])
  np.testing.assert_array_equal(guided['codes'], plain['codes'])
  for name in _logit_keys(plain):
    np.testing.assert_allclose(np.asarray(guided[name]), np.asarray(plain[name]),
                               atol=1e-4, rtol=1e-4, err_msg=name)


def _teacher(c, frames, rows):
  """Teacher-forcing input of `frames` for the variant: [rows, T, K]."""
  if c.model.variant == 'single_stream':
    mel = np.full((len(frames),), layout.MELODY_NULL, np.int32)
    frames = audio_slots(c, frames, mel, False).codes
  return jnp.asarray(np.stack([frames] * rows))


@pytest.mark.parametrize('variant', VARIANTS)
def test_cfg_guided_logits_are_u_plus_scale_times_c_minus_u(variant):
  c = F.small_config(variant=variant)
  m = F.make_model(c)
  both = _cond_and_null(c, seed=1)
  scale, nf = 3.0, 6
  s = G.Sampling(temperature=1.0, top_k=0, cfg_scale=scale, max_frames=nf)
  frames = F.frames(c, nf, np.random.default_rng(2))
  key = jax.random.key(0)
  guided = _generate(m, both, rng=key, sampling=s, num_cond=1,
                     teacher=_teacher(c, frames, 2), record_logits=True)
  cond, null = (_generate(m, _rows(both, [r]), rng=key, sampling=s, num_cond=1,
                          teacher=_teacher(c, frames, 1), record_logits=True)
                for r in (0, 1))
  # The conditions matter, or this test would prove nothing.
  for name in _logit_keys(guided):
    cc, uu = np.asarray(cond[name]), np.asarray(null[name])
    assert np.abs(cc - uu).max() > 1e-2, name
    np.testing.assert_allclose(np.asarray(guided[name]), uu + scale * (cc - uu),
                               atol=2e-4, rtol=2e-4, err_msg=name)
  # Teacher forcing: the three runs emitted the teacher's frames.
  for out in (guided, cond, null):
    assert int(out['num_frames'][0]) == nf
    np.testing.assert_array_equal(np.asarray(out['codes'])[0], frames)


# -------------------------------------------------------------- determinism


def test_seeds_batch_sizes_and_identical_prompts():
  c = F.small_config()
  m = F.make_model(c)
  k, v = c.model.num_codebooks, c.model.codebook_size
  rng = np.random.default_rng(3)
  a_ids = F.text_ids(c, 4, rng) + [F.audio_id(c)]
  b_ids = F.text_ids(c, 2, rng) + [F.audio_id(c)]
  null = [_extra(c, '<null_tags>'), _extra(c, '<null_lyrics>'), F.audio_id(c)]
  s = G.Sampling(temperature=1.0, top_k=0, max_frames=8, min_frames=8)
  one = G.make_generate_fn(m, s, num_cond=1)
  p1 = _prompts(c, [a_ids], 6)
  first = one(p1, jax.random.key(0))
  again = one(p1, jax.random.key(0))
  other = one(p1, jax.random.key(1))
  codes = np.asarray(first['codes'])
  assert codes.shape == (1, 8, k) and int(first['num_frames'][0]) == 8
  assert codes.min() >= 0 and codes.max() < v
  np.testing.assert_array_equal(codes, again['codes'])
  assert not np.array_equal(codes, np.asarray(other['codes']))

  # Two prompts with CFG in the same process: rows [a, a, null, null]. One
  # key, but every row draws its own noise: identical prompts give two
  # independent songs, and a row does not depend on the other rows' prompts.
  cfg = G.make_generate_fn(m, dataclasses.replace(s, cfg_scale=2.5), num_cond=2)
  same = cfg(_prompts(c, [a_ids, a_ids, null, null], 6), jax.random.key(0))
  assert same['codes'].shape == (2, 8, k)
  np.testing.assert_array_equal(same['num_frames'], [8, 8])
  assert not np.array_equal(np.asarray(same['codes'][0]),
                            np.asarray(same['codes'][1]))
  np.testing.assert_array_equal(
      cfg(_prompts(c, [a_ids, a_ids, null, null], 6), jax.random.key(0))['codes'],
      same['codes'])
  mixed = cfg(_prompts(c, [a_ids, b_ids, null, null], 6), jax.random.key(0))
  only_b = cfg(_prompts(c, [b_ids, b_ids, null, null], 6), jax.random.key(0))
  np.testing.assert_array_equal(mixed['codes'][0], same['codes'][0])
  np.testing.assert_array_equal(mixed['codes'][1], only_b['codes'][1])
  # The first compiled function is unaffected by the second.
  np.testing.assert_array_equal(one(p1, jax.random.key(0))['codes'], codes)


# ---------------------------------------------------------------------- END


def _force_end(m, amount: float):
  """Makes END's logit about `amount` * sqrt(E) at every step (state surgery).

  Every embedding row gets a large constant in dimension 0, so the normed
  hidden state's dimension 0 is about +sqrt(E) at every slot whatever the
  layers add; END is the only class that reads dimension 0."""
  end = layout.end_id(m.codebook_size)
  for table in (m.audio_embed, m.text_embed, m.melody_embed):
    table[...] = table[...].at[..., 0].set(100.0)
  if m.variant == 'global_local':
    m.head0[...] = m.head0[...].at[0, :].set(0.0).at[0, end].set(amount)
  else:
    m.heads[...] = m.heads[...].at[0, 0, :].set(0.0).at[0, 0, end].set(amount)
  return m


@pytest.mark.parametrize('variant', VARIANTS)
def test_end_min_frames_and_max_frames(variant):
  c = F.small_config(variant=variant)
  k = c.model.num_codebooks
  prompt = _prompts(c, [F.text_ids(c, 3, np.random.default_rng(4)) +
                        [F.audio_id(c)]], 5)
  nf = 8
  s = G.Sampling(temperature=1.0, top_k=0, max_frames=nf)
  key = jax.random.key(0)
  ends = _force_end(F.make_model(c), 50.0)
  out = _generate(ends, prompt, rng=key, sampling=s, num_cond=1,
                  record_logits=True)
  assert int(out['num_frames'][0]) == 0
  if variant == 'global_local':
    assert _steps_run(out) == 1                     # END at once, then stop
    assert not np.any(np.asarray(out['codes']))     # no frame was written

  late = _generate(ends, prompt, rng=key,
                   sampling=dataclasses.replace(s, min_frames=5), num_cond=1,
                   record_logits=True)
  assert int(late['num_frames'][0]) == 5
  codes = np.asarray(late['codes'])[0]
  assert codes[:5].min() >= 0 and codes[:5].max() < c.model.codebook_size
  if variant == 'global_local':
    assert _steps_run(late) == 6                    # 5 frames and the END
    assert not np.any(codes[5:])

  never = _force_end(F.make_model(c), -50.0)
  capped = _generate(never, prompt, rng=key, sampling=s, num_cond=1,
                     record_logits=True)
  assert capped['codes'].shape == (1, nf, k)
  assert int(capped['num_frames'][0]) == nf
  if variant == 'global_local':
    assert _steps_run(capped) == nf                 # stops at max_frames


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize('variant,pattern', [('global_local', 'delay'),
                                             ('single_stream', 'delay'),
                                             ('single_stream', 'flatten')])
def test_streaming_callback_sees_growing_prefixes_of_the_result(variant, pattern):
  c = F.small_config(variant=variant)
  c.model.pattern = pattern
  m = F.make_model(c)
  seen = []

  def callback(frames, counts):
    seen.append((np.array(frames), np.array(counts)))

  nf, every = 10, 3
  s = G.Sampling(temperature=1.0, top_k=0, max_frames=nf, min_frames=nf,
                 stream_every=every)
  prompt = _prompts(c, [F.text_ids(c, 3, np.random.default_rng(5)) +
                        [F.audio_id(c)]], 4)
  out = G.make_generate_fn(m, s, num_cond=1, callback=callback)(
      prompt, jax.random.key(2))
  jax.effects_barrier()
  final = np.asarray(out['codes'])
  assert int(out['num_frames'][0]) == nf
  counts = [int(cnt[0]) for _, cnt in seen]
  assert counts == list(range(every, nf + 1, every)), counts
  for frames, cnt in seen:
    n = int(cnt[0])
    assert frames.shape == (1, nf, c.model.num_codebooks)
    np.testing.assert_array_equal(frames[0, :n], final[0, :n])


# -------------------------------------------------------------- interleaved


def test_interleaved_sampled_sections_end_in_turn():
  c = F.small_config(layout_name='interleaved')
  m = _force_end(F.make_model(c), 50.0)
  rng = np.random.default_rng(6)
  a_id = F.audio_id(c)
  head = [F.text_ids(c, 1, rng)[0], _extra(c, '<null_ref>')]
  first = F.text_ids(c, 2, rng) + [a_id]
  second = F.text_ids(c, 3, rng) + [a_id]
  ls = len(second) + 1                           # one pad slot first
  sections = jnp.asarray([[[layout.EMPTY] * (ls - len(second)) + second]],
                         jnp.int32)
  nf, min_frames = 12, 3
  s = G.Sampling(temperature=1.0, top_k=0, max_frames=nf, min_frames=min_frames)
  out = _generate(m, _prompts(c, [head + first], len(head + first)),
                  rng=jax.random.key(1), sampling=s, num_cond=1,
                  sections=sections, record_logits=True)
  # Section 1: min_frames frames, then END -> the loop feeds section 2's text
  # (ls steps) -> back to audio: END at once (min_frames already reached) ->
  # no sections left: done. Only real frames count.
  assert int(out['num_frames'][0]) == min_frames
  assert _steps_run(out) == min_frames + 1 + ls + 1
  codes = np.asarray(out['codes'])[0]
  assert codes[:min_frames].max() < c.model.codebook_size
  assert not np.any(codes[min_frames:])
