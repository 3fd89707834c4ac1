"""Generating with the released HeartMuLa's settings: our decode loop on
heartlib's tiny checkpoint gives heartlib's own greedy guided decode
(tests/fixtures/heartmula_tiny/decode.npz, from heartlib's pipeline loop; see
the README there), the prompt builder gives heartlib's prompt, and a frame
with any code >= END ends the song."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicjax import config as cfg
from musicjax.export.released import heartmula as hw
from musicjax.lm import generate as G
from musicjax.lm import heartmula_prompt as hp
from musicjax.lm import layout
from musicjax.lm import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'heartmula_tiny')
TINY = os.path.join(REPO, 'configs', 'lm', 'heartmula_tiny.py')
# The fixture's text and the one codebook whose head may pick END+ in decode
# B (README).
TAGS = 'Pop, Piano'
LYRICS = '[Verse]\nLa la the SUN rise\nover hills\n'
STOP_BOOK = 4
# Guided logits, float32 on both sides, |logits| up to 5.1: the gap is
# summation order (measured 3.4e-6 at most on jax 0.10.2 and 0.12). The
# greedy picks cannot flip on it: every step's best and second-best guided
# logits are >= 2.2e-3 apart (asserted for the 20 frames below).
TOL = 2e-5


@pytest.fixture(scope='module')
def ref():
  with np.load(os.path.join(FIXTURE, 'reference.npz')) as f:
    return dict(f)


@pytest.fixture(scope='module')
def dec():
  with np.load(os.path.join(FIXTURE, 'decode.npz')) as f:
    return dict(f)


def _model(keep_end=()):
  """The fixture model with the head columns of classes >= END zeroed (as
  the fixture script did), except in the codebooks `keep_end`."""
  model, c = hw.load(FIXTURE, cfg.load(TINY))
  end = model_lib.end_id(c.model)
  if 0 not in keep_end:
    model.head0[...] = model.head0[...].at[:, end:].set(0.0)
  heads = model.local_heads[...]
  for i in range(1, c.model.num_codebooks):
    if i not in keep_end:
      heads = heads.at[i - 1, :, end:].set(0.0)
  model.local_heads[...] = heads
  return model, c


def _sampling(c, scale, frames, **kw):
  """heartlib's greedy settings: top-k 1 (ties kept), temperature 1."""
  return G.sampling_from_config(
      c.sample, cfg_scale=float(scale), top_k=1, temperature=1.0,
      max_frames=frames, end_id=model_lib.end_id(c.model), **kw)


def _generate(model, inputs, sampling, teacher=None):
  fn = jax.jit(lambda m, pr, r, rv: G.generate(
      m, pr, rng=jax.random.key(0), sampling=sampling, num_cond=1,
      ref_codes=r, ref_valid=rv, teacher=teacher, record_logits=True))
  out = fn(model, {k: jnp.asarray(v) for k, v in inputs['prompt'].items()},
           jnp.asarray(inputs['ref_embed']), jnp.asarray(inputs['ref_valid']))
  return {k: np.asarray(v) for k, v in out.items()}


def _close(got, want, what):
  err = float(np.max(np.abs(got - want)))
  assert err < TOL, f'{what}: max abs error {err}'


def _fixture_prompt(ref, c):
  """reference.npz's 14 prompt slots as a builder prompt (cond + uncond)."""
  p, slot = int(ref['prompt_len']), int(ref['ref_slot'])
  tokens = ref['tokens'][0, :p, -1]
  out = hp.build(c.model, tokens[:slot].tolist(), tokens[slot + 1:].tolist(),
                 cfg=True, ref_embed=ref['muq'][0])
  np.testing.assert_array_equal(out['prompt']['uncond'], [False, True])
  return out


def test_greedy_guided_decode_equals_heartlib(ref, dec):
  """20 frames of heartlib's pipeline loop (top-k 1, CFG 1.5) from the
  fixture's prompt: the same codes, and the same guided logits per step."""
  model, c = _model()
  want = dec['greedy_frames']                           # [20, K]
  lg = dec['greedy_logits']                             # [20, K, W]
  top = np.sort(lg, axis=-1)
  assert np.min(top[..., -1] - top[..., -2]) > 100 * TOL
  # The loop feeds back codes >= codebook_size (16, a special row < END).
  assert np.any(want == c.model.codebook_size)
  out = _generate(model, _fixture_prompt(ref, c),
                  _sampling(c, dec['cfg_scale'], len(want)))
  assert int(out['num_frames'][0]) == len(want)
  np.testing.assert_array_equal(out['codes'][0], want)
  n = len(want)
  _close(out['logits_global'][0, :n], lg[:, 0], 'codebook-0 guided logits')
  _close(out['logits_local'][0, :n], lg[:, 1:], 'local guided logits')


def test_temperature_zero_is_the_same_greedy_decode(ref, dec):
  model, c = _model()
  want = dec['greedy_frames']
  sampling = G.sampling_from_config(
      c.sample, cfg_scale=float(dec['cfg_scale']), temperature=0.0,
      max_frames=len(want), end_id=model_lib.end_id(c.model))
  out = _generate(model, _fixture_prompt(ref, c), sampling)
  np.testing.assert_array_equal(out['codes'][0], want)


def _released_folder(tmp_path):
  """heartlib's folder layout around the fixture's files."""
  root = tmp_path / 'released'
  lm = root / 'HeartMuLa-oss-tiny'
  lm.mkdir(parents=True)
  (root / 'HeartCodec-oss').mkdir()
  for name in (hw.CONFIG, hw.SINGLE):
    shutil.copy(os.path.join(FIXTURE, name), lm)
  for name in ('tokenizer.json', 'gen_config.json'):
    shutil.copy(os.path.join(FIXTURE, name), root)
  return str(root)


def test_text_prompt_and_any_code_end_equal_heartlib(tmp_path, dec):
  """Tags and lyrics through the folder's tokenizer give heartlib's prompt;
  decoding stops where heartlib's did: frame 1 holds a code >= END in
  codebook 4 only (codebook 0 is a code), so one frame is kept."""
  folder = _released_folder(tmp_path)
  c = cfg.load(TINY)
  inputs = hp.from_folder(folder, 'tiny', c.model, TAGS, LYRICS, cfg=True)
  text = inputs['prompt']['text']
  want = dec['text_prompt'].copy()
  slot = int(dec['text_ref_slot'])
  want[slot] = layout.REF_SLOT                    # heartlib: token 0, replaced
  np.testing.assert_array_equal(text, np.stack([want, want]))
  np.testing.assert_array_equal(inputs['ref_embed'], 0.0)   # as released
  made, end = dec['text_made'], model_lib.end_id(c.model)
  assert len(dec['text_frames']) == 1 and len(made) == 2
  assert made[0].max() < end and made[1][0] < end
  assert np.flatnonzero(made[1] >= end).tolist() == [STOP_BOOK]

  model, _ = _model(keep_end=(STOP_BOOK,))
  out = _generate(model, inputs, _sampling(c, dec['cfg_scale'], 20))
  assert int(out['num_frames'][0]) == 1
  np.testing.assert_array_equal(out['codes'][0, :1], dec['text_frames'])
  lg = dec['text_logits']                              # [2, K, W]
  _close(out['logits_global'][0, :2], lg[:, 0], 'codebook-0 guided logits')
  _close(out['logits_local'][0, :2], lg[:, 1:], 'local guided logits')


def test_min_frames_removes_end_from_every_codebook(tmp_path, dec):
  """Before min_frames no code >= END is sampled in any codebook (the
  decode above would stop after one frame)."""
  c = cfg.load(TINY)
  inputs = hp.from_folder(_released_folder(tmp_path), 'tiny', c.model, TAGS,
                          LYRICS, cfg=True)
  model, _ = _model(keep_end=(STOP_BOOK,))
  out = _generate(model, inputs, _sampling(c, dec['cfg_scale'], 6,
                                           min_frames=6))
  assert int(out['num_frames'][0]) == 6
  assert out['codes'][0].max() < model_lib.end_id(c.model)
  assert np.all(out['logits_local'][0, :6, :, model_lib.end_id(c.model):]
                == -np.inf)


def test_teacher_frame_with_any_end_code_stops():
  """A constructed frame with END+ in one local codebook only ends the song
  at that frame (all heads of the unmodified model)."""
  model, c = _model(keep_end=range(8))
  end = model_lib.end_id(c.model)
  inputs = hp.build(c.model, [1, 2, 3], [4, 5], cfg=False)
  teacher = np.arange(6 * 8).reshape(1, 6, 8) % c.model.codebook_size
  teacher[0, 3, 5] = end + 2                           # a special row above END
  out = _generate(model, inputs, _sampling(c, 1.0, 6),
                  teacher=jnp.asarray(teacher, jnp.int32))
  assert int(out['num_frames'][0]) == 3
  np.testing.assert_array_equal(out['codes'][0, :3], teacher[0, :3])


def test_end_id_is_required_with_wide_heads():
  model, c = _model()
  inputs = hp.build(c.model, [1], [2], cfg=False)
  with pytest.raises(ValueError, match='end_id'):
    _generate(model, inputs, G.Sampling(max_frames=2))


# ---- the prompt builder ---------------------------------------------------------
class _Tok:
  """A tokenizer stand-in: one id per character, no BOS of its own."""

  def encode(self, text):
    return type('E', (), {'ids': [ord(ch) % 50 for ch in text]})()


GEN = hp.GenConfig(text_bos_id=60, text_eos_id=61, audio_eos_id=17, empty_id=0)


def test_text_ids_wrap_tags_and_add_bos_eos_once():
  tok = _Tok()
  wrapped = hp.text_ids(tok, '<tag>pop</tag>', GEN, tags=True)
  assert wrapped == hp.text_ids(tok, 'POP', GEN, tags=True)
  assert wrapped[0] == 60 and wrapped[-1] == 61
  assert wrapped[1:-1] == [ord(ch) % 50 for ch in '<tag>pop</tag>']
  assert hp.text_ids(tok, '', GEN, tags=False) == [60, 61]


@pytest.mark.parametrize('missing', ['HeartMuLa-oss-tiny', 'HeartCodec-oss',
                                     'tokenizer.json', 'gen_config.json'])
def test_missing_part_is_named(tmp_path, missing):
  folder = _released_folder(tmp_path)
  path = os.path.join(folder, missing)
  shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  with pytest.raises(hp.HeartMuLaFolderError, match=missing):
    hp.from_folder(folder, 'tiny', cfg.load(TINY).model, 'a', 'b', cfg=True)


def test_gen_config_errors(tmp_path):
  folder = _released_folder(tmp_path)
  path = os.path.join(folder, 'gen_config.json')
  m = cfg.load(TINY).model
  with open(path, 'w') as f:
    f.write('{"text_bos_id": 60, "text_eos_id": 61, "empty_id": 0}')
  with pytest.raises(hp.HeartMuLaFolderError, match='audio_eos_id'):
    hp.from_folder(folder, 'tiny', m, 'a', 'b', cfg=True)
  with open(path, 'w') as f:
    f.write('{"text_bos_id": 60, "text_eos_id": 61, "audio_eos_id": 16, '
            '"empty_id": 0}')
  with pytest.raises(hp.HeartMuLaFolderError, match='config.model.end_id = 17'):
    hp.from_folder(folder, 'tiny', m, 'a', 'b', cfg=True)


def test_ids_outside_the_vocabulary():
  with pytest.raises(hp.HeartMuLaFolderError, match='text_vocab_size = 64'):
    hp.build(cfg.load(TINY).model, [1, 64], [2], cfg=False)
