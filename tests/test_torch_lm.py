"""musicjax_torch.AudioLM against the JAX LM: training-forward logits, greedy
CFG decoding, and the export -> PyTorch -> import round trip.

Tiny random-init LMs from lm_fixtures are exported by `musicjax export`'s code
and loaded with musicjax_torch.from_pretrained.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lm_fixtures as F
import musicjax_torch
from musicjax_torch import lm as torch_lm
from musicjax.export import export as export_lib
from musicjax.export import import_torch
from musicjax.lm import generate as G
from musicjax.lm import layout
from musicjax.lm import sequence
from musicjax.lm.data import audio_slots

# Float32 parity: max |torch - jax| <= REL * max |jax| (XLA and torch sum in
# different orders; measured ~1e-6).
REL = 1e-4
# A bfloat16 export computed in bfloat16 against the float32 JAX model, same
# measure. bf16 keeps 8 mantissa bits (rounding 2^-9 per weight and
# activation); measured 0.007 to 0.011 on these models.
BF16_REL = 0.05
BF16_FRAMES = 8
# Greedy decoding: frames per song and a guidance scale far from 1, so the
# null rows matter.
MAX_FRAMES = 50
CFG_SCALE = 3.0
# Condition text tokens of each conditional row of the greedy test.
COND_TEXT = (4, 2)
# Slots of a training example; two rows with different song lengths, so the
# shorter one is right-padded.
SEQ_LEN = 40
ROW_FRAMES = (6, 4)
REF_FRAMES = 5
# Teacher-forced interleaved decode: frames and text tokens per section (the
# first section's text is in the prompt).
SECTION_FRAMES = (4, 5, 3)
SECTION_TEXT = (0, 2, 3)
# Local transformer limited to fewer frame slots than row 0 has (training
# memory cap): the gathered slots must be the first ones in order.
LOCAL_SLOTS = 4
# Sampling checks: rows of random logits, top-k, a nucleus that keeps only
# the best token, and a short seeded song.
SAMPLE_ROWS, TOP_K, TOP_P, TINY_TOP_P, SAMPLE_FRAMES = 200, 3, 0.9, 1e-6, 8


@pytest.fixture(autouse=True, scope='module')
def _one_torch_thread():
  """Tiny matmuls: a second thread only adds contention with XLA's pool
  (measured 0.24 s vs 1.6 s for a 50-frame decode)."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


# ------------------------------------------------------------------ helpers
def assert_close(got, want, rel: float, what: str) -> None:
  """Scale-relative closeness; infinities (END barred before min_frames)
  must sit at the same places."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  finite = np.isfinite(want)
  np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=what)
  got, want = got[finite], want[finite]
  err, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
  assert err <= rel * scale, f'{what}: max error {err:.3g} > {rel} * {scale:.3g}'


def export(tmp_path, variant='global_local', layout_name='prefix',
           dtype='float32', pattern='delay'):
  """(config, JAX model, export dir) of a tiny random LM."""
  c = F.small_config(variant=variant, layout_name=layout_name)
  c.model.pattern = pattern
  model = F.make_model(c)
  out = str(tmp_path / f'{variant}-{layout_name}-{pattern}-{dtype}')
  export_lib.export_model(model, c, out, dtype=dtype)
  return c, model, out


def to_torch(arrays: dict) -> dict:
  return {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}


def to_jax(arrays: dict) -> dict:
  return {k: jnp.asarray(v) for k, v in arrays.items()}


def extra(c, token: str) -> int:
  return layout.extra_id(c.model.text_vocab_size, token)


def song_parts(c, layout_name: str, frames: int, rng) -> list:
  """Condition text and audio of one song: one section (prefix) or two
  (interleaved), each audio part ending in END."""
  cond = [1] + F.text_ids(c, 3, rng) + [extra(c, '<ref>')]
  if layout_name == 'prefix':
    return [sequence.TextPart(cond + [F.audio_id(c)]),
            audio_slots(c, F.frames(c, frames, rng), F.melody(frames, rng), True)]
  parts = [sequence.TextPart(cond)]
  for n in (frames, frames - 1):
    parts.append(sequence.TextPart(F.text_ids(c, 2, rng) + [F.audio_id(c)]))
    parts.append(audio_slots(c, F.frames(c, n, rng), F.melody(n, rng), True))
  return parts


def training_batch(c, layout_name: str, seed: int = 0) -> dict:
  """Two rows of different lengths; row 0 has a reference segment, row 1
  drops it (its <ref> slot then adds nothing)."""
  rng = np.random.default_rng(seed)
  k, v = c.model.num_codebooks, c.model.codebook_size
  rows = [sequence.assemble(song_parts(c, layout_name, n, rng), SEQ_LEN, k, v)
          for n in ROW_FRAMES]
  batch = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
  batch['ref_codes'] = np.stack([F.frames(c, REF_FRAMES, rng)] * len(rows))
  batch['ref_valid'] = np.array([True, False])
  return batch


def prompt_row(c, ids: list[int], pad: int) -> dict:
  ex = sequence.assemble([sequence.TextPart(ids)], len(ids),
                         c.model.num_codebooks, c.model.codebook_size)
  return sequence.left_pad(ex, len(ids) + pad)


def cfg_prompt(c, rng, text_lengths=(4,)) -> dict:
  """One conditional row per text length, then as many rows of the learned
  null conditions. Rows are left-padded to the longest, so each starts its
  rotary positions at another cache slot."""
  conds = [[1] + F.text_ids(c, n, rng) + [extra(c, '<ref>'), F.audio_id(c)]
           for n in text_lengths]
  null = [1, extra(c, '<null_tags>'), extra(c, '<null_lyrics>'),
          extra(c, '<null_ref>'), F.audio_id(c)]
  ids = conds + [null] * len(conds)
  width = max(map(len, ids))
  rows = [prompt_row(c, r, width - len(r)) for r in ids]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def jax_generate(model, prompt, sampling, num_cond=1, **kw):
  fn = jax.jit(lambda m, p, kw: G.generate(
      m, p, rng=jax.random.key(0), sampling=sampling, num_cond=num_cond,
      record_logits=True, **kw))
  return fn(model, to_jax(prompt), to_jax(kw))


def assert_same_logits(got: dict, want: dict) -> None:
  """A training forward's outputs: logits close, frame-slot indices equal."""
  assert set(got) == set(want)
  for key in want:
    if key == 'local_index':
      np.testing.assert_array_equal(got[key].numpy(), np.asarray(want[key]))
    else:
      assert_close(got[key].numpy(), want[key], REL, key)


def assert_same_decode(jax_out, torch_out) -> None:
  """Same tokens and frame counts; the recorded guided logits agree."""
  np.testing.assert_array_equal(np.asarray(jax_out['num_frames']),
                                torch_out['num_frames'].numpy())
  np.testing.assert_array_equal(np.asarray(jax_out['codes']),
                                torch_out['codes'].numpy())
  for key in jax_out:
    if key.startswith('logits'):
      assert_close(torch_out[key].numpy(), jax_out[key], REL, key)


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize('scaling', ['none', 'llama3'])
def test_rope_matches_jax(scaling):
  """The rotate-half layout itself (attention alone cannot tell a
  permutation applied to both queries and keys), plain and Llama-3 scaled."""
  from musicjax.nn import transformer as jax_transformer
  from musicjax_torch import transformer as torch_transformer
  c = jax_transformer.default_config()
  c.rope_theta, c.rope_scaling = 500.0, scaling
  c.rope_original_context = 64  # wavelengths 6, 30, 141, 664: all three bands
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 100, (2, 5)).astype(np.int32)
  want = jax_transformer.rope(jnp.asarray(x), jnp.asarray(pos),
                              jax_transformer.Rotary.from_config(c))
  freq = torch_transformer.rope_frequencies(c.to_dict(), 4)
  got = torch_transformer.rope(torch.as_tensor(x), torch.as_tensor(pos), freq)
  assert_close(got.numpy(), want, REL, 'rope')


@pytest.mark.parametrize('variant', ['global_local', 'single_stream'])
@pytest.mark.parametrize('layout_name', ['prefix', 'interleaved'])
def test_forward_logits_match_jax(tmp_path, variant, layout_name):
  c, jax_model, path = export(tmp_path, variant, layout_name)
  model = musicjax_torch.from_pretrained(path)
  batch = training_batch(c, layout_name)
  want = jax_model(to_jax(batch))
  with torch.no_grad():
    got = model(to_torch(batch))
  assert_same_logits(got, want)
  if variant == 'global_local':
    want = jax_model(to_jax(batch), LOCAL_SLOTS)
    with torch.no_grad():
      got = model(to_torch(batch), LOCAL_SLOTS)
    assert got['local_index'].shape[1] == LOCAL_SLOTS
    assert_same_logits(got, want)


@pytest.mark.parametrize('variant', ['global_local', 'single_stream'])
def test_bfloat16_export_forward_is_close(tmp_path, variant):
  c, jax_model, path = export(tmp_path, variant, dtype='bfloat16')
  model = musicjax_torch.from_pretrained(path)
  assert model.text_embed.weight.dtype == torch.bfloat16
  batch = training_batch(c, 'prefix')
  want = jax_model(to_jax(batch))
  with torch.no_grad():
    got = model(to_torch(batch))
  for key in want:
    if key != 'local_index':
      assert got[key].dtype == torch.float32      # logits are widened
      assert_close(got[key].numpy(), want[key], BF16_REL, key)
  # The decode loop runs in bfloat16 too (caches in the weights' dtype).
  out = model.generate(to_torch(cfg_prompt(c, np.random.default_rng(0))),
                       max_frames=BF16_FRAMES, cfg_scale=CFG_SCALE,
                       temperature=0.0, min_frames=BF16_FRAMES)
  assert out['num_frames'].tolist() == [BF16_FRAMES]
  codes = out['codes']
  assert codes.min() >= 0 and codes.max() < c.model.codebook_size


# ----------------------------------------------------------------- decoding
@pytest.mark.parametrize('variant,pattern,min_frames,seed', [
    ('global_local', 'delay', 0, 0),
    # Rows end with a sampled END at different frames (asserted below).
    ('single_stream', 'delay', 0, 3),
    ('single_stream', 'flatten', MAX_FRAMES, 0),
])
def test_greedy_cfg_decoding_matches_jax(tmp_path, variant, pattern, min_frames,
                                         seed):
  """Two conditional rows (their own tokens) and their two null rows."""
  c, jax_model, path = export(tmp_path, variant, pattern=pattern)
  model = musicjax_torch.from_pretrained(path)
  rng = np.random.default_rng(seed)
  n = len(COND_TEXT)
  prompt = cfg_prompt(c, rng, COND_TEXT)
  cond = {'melody': np.stack([F.melody(MAX_FRAMES, rng)] * 2 * n),
          'ref_codes': np.stack([F.frames(c, REF_FRAMES, rng)] * 2 * n),
          'ref_valid': np.ones(2 * n, bool)}
  sampling = G.Sampling(temperature=0.0, top_k=0, cfg_scale=CFG_SCALE,
                        max_frames=MAX_FRAMES, min_frames=min_frames)
  want = jax_generate(jax_model, prompt, sampling, num_cond=n, **cond)
  got = model.generate(to_torch(prompt), max_frames=MAX_FRAMES,
                       cfg_scale=CFG_SCALE, temperature=0.0, top_k=0,
                       num_cond=n, min_frames=min_frames, record_logits=True,
                       **to_torch(cond))
  frames = got['num_frames'].tolist()
  assert min(frames) > 0
  if variant == 'single_stream' and not min_frames:
    assert len(set(frames)) == n and min(frames) < MAX_FRAMES, frames
  else:
    assert frames == [MAX_FRAMES] * n
  assert_same_decode(want, got)


def test_teacher_forced_sections_decode_matches_jax(tmp_path):
  """Interleaved layout: END frames end a section, the next section's
  left-padded text is fed, then its frames; three sections, so the text
  pointer must restart; both loops must agree step by step."""
  c, jax_model, path = export(tmp_path, 'global_local', 'interleaved')
  model = musicjax_torch.from_pretrained(path)
  rng = np.random.default_rng(2)
  k, v = c.model.num_codebooks, c.model.codebook_size
  end = np.full((1, k), layout.EMPTY, np.int32)
  end[0, 0] = layout.end_id(v)
  songs = [F.frames(c, n, rng) for n in SECTION_FRAMES]
  teacher = np.concatenate([x for f in songs for x in (f, end)])
  texts = [F.text_ids(c, n, rng) + [F.audio_id(c)] for n in SECTION_TEXT[1:]]
  width = max(map(len, texts)) + 1          # every text has a pad slot
  sections = [[layout.EMPTY] * (width - len(t)) + t for t in texts]
  prompt = cfg_prompt(c, rng)
  # Room for two more frames than the song: the loop must stop at the END.
  nf = sum(SECTION_FRAMES) + 2
  cond = {'melody': np.stack([F.melody(nf, rng)] * 2),
          'teacher': np.stack([teacher] * 2),
          'sections': np.asarray([sections] * 2, np.int32)}
  sampling = G.Sampling(temperature=0.0, cfg_scale=CFG_SCALE, max_frames=nf)
  want = jax_generate(jax_model, prompt, sampling, **cond)
  got = model.generate(to_torch(prompt), max_frames=nf, cfg_scale=CFG_SCALE,
                       temperature=0.0, num_cond=1, record_logits=True,
                       **to_torch(cond))
  assert int(got['num_frames'][0]) == sum(SECTION_FRAMES)
  assert_same_decode(want, got)


def test_sampling_stays_in_top_k_and_nucleus(tmp_path):
  """Sampled tokens come from the top-k set; a tiny top_p keeps only the
  best token; a seeded generator repeats a song."""
  c, _, path = export(tmp_path)
  model = musicjax_torch.from_pretrained(path)
  sampler = torch_lm.Sampler(temperature=1.0, top_k=TOP_K, top_p=1.0,
                             cfg_scale=1.0, num_cond=SAMPLE_ROWS,
                             generator=torch.Generator().manual_seed(0))
  logits = torch.randn(SAMPLE_ROWS, c.model.codebook_size,
                       generator=torch.Generator().manual_seed(1))
  best = torch.topk(logits, TOP_K).indices
  assert (sampler.sample(logits)[:, None] == best).any(-1).all()
  sampler.top_p = TINY_TOP_P
  assert torch.equal(sampler.sample(logits), logits.argmax(-1))
  prompt = to_torch(cfg_prompt(c, np.random.default_rng(0)))
  songs = [model.generate(prompt, max_frames=SAMPLE_FRAMES,
                          cfg_scale=CFG_SCALE, top_k=TOP_K, top_p=TOP_P,
                          num_cond=1, generator=torch.Generator().manual_seed(7))
           for _ in range(2)]
  assert torch.equal(songs[0]['codes'], songs[1]['codes'])


# --------------------------------------------------------------- round trip
@pytest.mark.parametrize('variant', ['global_local', 'single_stream'])
def test_round_trip_through_torch_is_bit_exact(tmp_path, variant):
  c, jax_model, path = export(tmp_path, variant)
  model = musicjax_torch.from_pretrained(path)
  out = str(tmp_path / 'from_torch')
  musicjax_torch.save_pretrained(model, out)
  fresh = F.make_model(c, seed=1)
  want = export_lib.state_paths(jax_model)
  before = export_lib.state_paths(fresh)
  assert not all(np.array_equal(before[p], want[p]) for p in want)
  import_torch.load_into(fresh, 'lm', out)
  got = export_lib.state_paths(fresh)
  assert set(got) == set(want)
  for p in want:
    a, b = np.asarray(got[p]), np.asarray(want[p])
    assert a.dtype == b.dtype and a.shape == b.shape, p
    np.testing.assert_array_equal(a, b, err_msg=p)


def test_fine_tune_in_torch_then_import_back(tmp_path):
  """The documented workflow: load an export in PyTorch, take optimizer
  steps on a cross-entropy loss, save, import into JAX. The JAX model then
  computes what the fine-tuned PyTorch model computes (not the original)."""
  c, jax_model, path = export(tmp_path)
  model = musicjax_torch.from_pretrained(path).train()
  batch = to_torch(training_batch(c, 'prefix'))
  opt = torch.optim.Adam(model.parameters(), lr=1e-2)
  target = batch['audio'][:, 1:, 0].clamp(min=0).long()
  losses = []
  for _ in range(3):
    logits = model(batch)['global'][:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             target.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
  assert losses[-1] < losses[0]
  out = str(tmp_path / 'tuned')
  musicjax_torch.save_pretrained(model.eval(), out)
  tuned = F.make_model(c, seed=1)
  import_torch.load_into(tuned, 'lm', out)
  with torch.no_grad():
    want = model(batch)
  jb = to_jax(training_batch(c, 'prefix'))
  assert_same_logits(want, tuned(jb))
  before = np.asarray(jax_model(jb)['global'])
  assert np.max(np.abs(before - np.asarray(tuned(jb)['global']))) > 1e-2


def test_top_k_keeps_ties_as_jax():
  """logits (2, 1, 1, 1, 0), top_k 2 (hand-checked in test_lm_sampling):
  ties kept -> tokens 0..3 with (e, 1, 1, 1) / (e + 3); exactly k -> tokens
  0 and 1 only."""
  logits = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0]).expand(20000, 5)
  e = np.e
  for keep, want in ((True, [e / (e + 3)] + [1 / (e + 3)] * 3 + [0.0]),
                     (False, [e / (e + 1), 1 / (e + 1), 0.0, 0.0, 0.0])):
    sampler = torch_lm.Sampler(temperature=1.0, top_k=2, top_p=1.0,
                               cfg_scale=1.0, num_cond=20000,
                               generator=torch.Generator().manual_seed(0),
                               top_k_keep_ties=keep)
    freq = np.bincount(sampler.sample(logits).numpy(), minlength=5) / 20000
    assert (freq[np.asarray(want) == 0] == 0).all(), (keep, freq)
    np.testing.assert_allclose(freq, want, atol=0.02)
