"""The one-jit decode loop against the training forward pass, and sampling."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lm_fixtures as F
from musicjax.kernels import dispatch
from musicjax.kernels import targets
from musicjax.lm import generate as G
from musicjax.lm import layout
from musicjax.lm import patterns
from musicjax.lm import sequence
from musicjax.lm.data import audio_slots

REF_FRAMES = 6


def _prompt(c, ids, pad):
  ex = sequence.assemble([sequence.TextPart(ids)], len(ids),
                         c.model.num_codebooks, c.model.codebook_size)
  ex = sequence.left_pad(ex, len(ids) + pad)
  return {k: jnp.asarray(v)[None] for k, v in ex.items()}


def _section_text(ids, length):
  return [layout.EMPTY] * (length - len(ids)) + list(ids)


@pytest.mark.parametrize('layout_name', ['prefix', 'interleaved'])
def test_teacher_forced_decode_equals_training_forward_global_local(layout_name):
  c = F.small_config(layout_name=layout_name)
  m = F.make_model(c)
  rng = np.random.default_rng(0)
  k, v = c.model.num_codebooks, c.model.codebook_size
  a_id = F.audio_id(c)
  cond = F.text_ids(c, 3, rng) + [layout.extra_id(c.model.text_vocab_size, '<ref>')]
  t1 = F.text_ids(c, 2, rng) + [a_id]
  f1, m1 = F.frames(c, 4, rng), F.melody(4, rng)
  ref = jnp.asarray(F.frames(c, REF_FRAMES, rng))[None]
  end = np.full((1, k), layout.EMPTY, np.int32)
  end[0, 0] = layout.end_id(v)
  if layout_name == 'interleaved':
    t2 = F.text_ids(c, 3, rng) + [a_id]
    f2, m2 = F.frames(c, 5, rng), F.melody(5, rng)
    parts = [sequence.TextPart(cond + t1),
             sequence.AudioPart(f1, m1, True, next_melody=int(m2[0])),
             sequence.TextPart(t2), sequence.AudioPart(f2, m2, True)]
    ls = len(t2) + 2                       # two pad slots before the text
    sections = jnp.asarray([[_section_text(t2, ls)]], jnp.int32)
    teacher = np.concatenate([f1, end, f2, end])
    mel = np.concatenate([m1, m2])
    # Loop steps in audio mode: section 1 frames + END, then after ls text
    # steps, section 2 frames + END.
    audio_steps = list(range(len(f1) + 1)) + [
        len(f1) + 1 + ls + i for i in range(len(f2) + 1)]
  else:
    parts = [sequence.TextPart(cond + t1), sequence.AudioPart(f1, m1, True)]
    sections = None
    teacher = np.concatenate([f1, end])
    mel = m1
    audio_steps = list(range(len(f1) + 1))
  ex = sequence.assemble(parts, 40, k, v)
  batch = {kk: jnp.asarray(x)[None] for kk, x in ex.items()}
  batch.update(ref_codes=ref, ref_valid=jnp.ones((1,), bool))
  train = m(batch)
  # Training slots whose next slot holds audio (a frame or END), in order.
  nxt = np.asarray(ex['audio'])[1:, 0]
  q = [i for i in range(len(nxt)) if ex['valid'][i + 1] and nxt[i] >= 0]
  assert len(q) == len(audio_steps)

  # Room for two more frames than the song: the loop must stop at END.
  mel = np.concatenate([mel, [layout.MELODY_NULL] * 2])
  sampling = G.Sampling(temperature=1.0, top_k=0, max_frames=len(mel))
  out = jax.jit(lambda mm, pr, t, s, me, r: G.generate(
      mm, pr, rng=jax.random.key(0), sampling=sampling, num_cond=1,
      sections=s, melody=me, ref_codes=r, ref_valid=jnp.ones((1,), bool),
      teacher=t, record_logits=True))(
          m, _prompt(c, cond + t1, pad=3), jnp.asarray(teacher)[None], sections,
          jnp.asarray(mel)[None], ref)
  np.testing.assert_allclose(np.asarray(out['logits_global'])[0, audio_steps],
                             np.asarray(train['global'])[0, q], atol=2e-4, rtol=2e-4)
  # Local logits exist for real frames (not for the END prediction).
  frame_steps = [s for s, qq in zip(audio_steps, q) if nxt[qq] < v]
  frame_q = [qq for qq in q if nxt[qq] < v]
  # The training pass gathers frame slots: row j of 'local' is slot index[j].
  row_of = {int(sl): j for j, sl in enumerate(np.asarray(train['local_index'])[0])}
  np.testing.assert_allclose(np.asarray(out['logits_local'])[0, frame_steps],
                             np.moveaxis(np.asarray(train['local']), 0, 2)[
                                 0, [row_of[qq] for qq in frame_q]],
                             atol=2e-4, rtol=2e-4)
  assert int(out['num_frames'][0]) == len(mel) - 2
  np.testing.assert_array_equal(np.asarray(out['codes'])[0, :len(mel) - 2],
                                teacher[teacher[:, 0] < v])


@pytest.mark.parametrize('pattern', ['delay', 'parallel', 'flatten'])
def test_teacher_forced_decode_equals_training_forward_single_stream(pattern):
  c = F.small_config(variant='single_stream')
  c.model.pattern = pattern
  m = F.make_model(c)
  rng = np.random.default_rng(1)
  k, v = c.model.num_codebooks, c.model.codebook_size
  cond = F.text_ids(c, 3, rng) + [F.audio_id(c)]
  nf = 5
  f, mel = F.frames(c, nf, rng), F.melody(nf, rng)
  part = audio_slots(c, f, mel, True)
  ex = sequence.assemble([sequence.TextPart(cond), part], 60, k, v)
  batch = {kk: jnp.asarray(x)[None] for kk, x in ex.items()}
  train = m(batch)['stream']
  # Room for two more frames than the song: the loop must stop at END.
  sampling = G.Sampling(max_frames=nf + 2)
  mel_in = np.concatenate([mel, [layout.MELODY_NULL] * 2])
  out = jax.jit(lambda mm, pr, t, me: G.generate(
      mm, pr, rng=jax.random.key(0), sampling=sampling, num_cond=1,
      melody=me, teacher=t, record_logits=True))(
          m, _prompt(c, cond, pad=2), jnp.asarray(part.codes)[None],
          jnp.asarray(mel_in)[None])
  got = np.asarray(out['logits_stream'])[0]
  p0 = len(cond) - 1
  # The loop stops once every real frame is complete and END was seen.
  pat = patterns.make_pattern(pattern, k, nf + 1)
  steps = max(pat.step_index[nf - 1].max(), pat.step_index[nf, 0]) + 1
  np.testing.assert_allclose(got[:steps], np.asarray(train)[0, p0:p0 + steps],
                             atol=2e-4, rtol=2e-4)
  assert int(out['num_frames'][0]) == nf
  np.testing.assert_array_equal(np.asarray(out['codes'])[0, :nf], f)


def _kernel_case(variant):
  """A model with head dim 16 (the smallest Triton tile) and a CFG prompt
  whose null row is shorter: left padding puts holes into the cache."""
  c = F.small_config(variant=variant, layout_name='interleaved')
  c.model.backbone.dim = 64
  m = F.make_model(c)
  rng = np.random.default_rng(1)
  cond = _prompt(c, F.text_ids(c, 5, rng) + [F.audio_id(c)], pad=0)
  null = _prompt(c, [F.audio_id(c)], pad=5)
  prompt = {k: jnp.concatenate([cond[k], null[k]]) for k in cond}
  return c, m, prompt, rng


@pytest.mark.parametrize('variant', ['global_local', 'single_stream'])
def test_pallas_decode_attention_gives_the_same_song(variant):
  """The Pallas kernel (interpreted on CPU) in place of XLA's decode
  attention: same tokens for a fixed seed, same logits to float32 rounding.
  CFG rows with a shorter null prompt and a second section's left-padded
  text put holes into the cache that the kernel must skip."""
  c, m, prompt, rng = _kernel_case(variant)
  sections = None
  if variant == 'global_local':
    t2 = F.text_ids(c, 2, rng) + [F.audio_id(c)]
    sections = jnp.asarray([[_section_text(t2, 5)]] * 2, jnp.int32)
  out = {}
  for attention in ('xla', 'pallas'):
    s = G.Sampling(temperature=1.0, top_k=0, max_frames=12, cfg_scale=2.0,
                   attention=attention, attention_block_k=16,
                   attention_splits=2)
    out[attention] = jax.jit(lambda mm, pr, se, s=s: G.generate(
        mm, pr, rng=jax.random.key(3), sampling=s, num_cond=1, sections=se,
        record_logits=True))(m, prompt, sections)
  a, b = out['xla'], out['pallas']
  np.testing.assert_array_equal(np.asarray(a['codes']), np.asarray(b['codes']))
  np.testing.assert_array_equal(np.asarray(a['num_frames']),
                                np.asarray(b['num_frames']))
  assert int(a['num_frames'][0]) > 0
  for key in a:
    if key.startswith('logits'):
      np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]),
                                 atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('variant', ['global_local', 'single_stream'])
@pytest.mark.parametrize('platform,resolved_as,block_k,marker', [
    ('cuda', 'gpu', 16, '__gpu$xla.gpu.triton'),
    ('tpu', 'tpu', 128, 'tpu_custom_call')])
def test_generate_lowers_with_the_kernel_on_gpu_and_tpu(
    monkeypatch, variant, platform, resolved_as, block_k, marker):
  """The whole decode loop, as 'auto' builds it on a GPU or TPU, lowers for
  that platform from this CPU machine, with one kernel call per global layer
  (split caches, CFG rows and the loop around it included)."""
  # An Ampere GPU (arch 8.0): the Triton wrapper, on every jax version.
  monkeypatch.setattr(dispatch, 'resolve',
                      functools.partial(dispatch.resolve, platform=resolved_as,
                                        arch=8.0))
  c, m, prompt, rng = _kernel_case(variant)
  s = G.Sampling(temperature=1.0, max_frames=12, cfg_scale=2.0,
                 attention='auto', attention_block_k=block_k,
                 attention_splits=2)
  fn = jax.jit(lambda mm, pr: G.generate(mm, pr, rng=jax.random.key(3),
                                         sampling=s, num_cond=1))
  with targets.lowering_target(platform):
    text = fn.trace(m, prompt).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(marker) == c.model.backbone.num_layers
