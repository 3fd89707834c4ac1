"""musicjax_torch.AudioLM on the released HeartMuLa's layout: heartlib's tiny
checkpoint (tests/fixtures/heartmula_tiny), imported with `musicjax
import-heartmula` and exported with `musicjax export`, loads in PyTorch and
computes what the JAX model computes: teacher-forced logits (Llama-3 RoPE
scaling, END as a codebook-0 class of a 21-row table, no LM extra text
tokens, the unconditional row of CFG rows, the biased reference linear, no
melody), the greedy guided decode (heartlib's own 20 frames), the any-code
END stop and min_frames; the trip back to JAX is bit exact."""
from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import musicjax_torch
from musicjax import cli
from musicjax import config as cfg
from musicjax.export import export as export_lib
from musicjax.export import import_torch
from musicjax.export.released import heartmula as hw
from musicjax.lm import generate as G
from musicjax.lm import heartmula_prompt as hp
from musicjax.lm import layout
from musicjax.lm import model as model_lib
from musicjax_torch import io as torch_io
from musicjax_torch import lm as torch_lm

import test_import_heartmula as imp_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'heartmula_tiny')
TINY = os.path.join(REPO, 'configs', 'lm', 'heartmula_tiny.py')
# float32 on both sides, O(1) weights, |logits| up to 4.3: max |torch - jax|
# (absolute) is summation order, measured 3.3e-6 (teacher-forced) and 3.4e-6
# (guided decode logits) on jax 0.10.2 and 0.12.1, torch 2.13. Without the
# Llama-3 RoPE scaling the gap is about 6e-3 (asserted > 100 * TOL).
TOL = 1e-5
# heartlib's own float32 outputs (the fixture's README): measured 2.1e-6;
# the JAX tests hold them to 2e-5 too.
HEARTLIB_TOL = 2e-5
# A bfloat16 export computed in bfloat16, relative to max |jax logits|:
# measured 0.008 (codebook 0) and 0.024 (local).
BF16_REL = 0.05
# The codebook whose head picks END+ in the fixture's text decode, and the
# frame and class of a constructed teacher stop (as the JAX tests).
STOP_BOOK = 4
TEACHER_FRAMES, TEACHER_STOP, TEACHER_BOOK = 6, 3, 5
MIN_FRAMES = 6


@pytest.fixture(autouse=True, scope='module')
def _one_torch_thread():
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.fixture(scope='module')
def ref():
  with np.load(os.path.join(FIXTURE, 'reference.npz')) as f:
    return dict(f)


@pytest.fixture(scope='module')
def dec():
  with np.load(os.path.join(FIXTURE, 'decode.npz')) as f:
    return dict(f)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """The export directory of an imported run: heartlib's folder layout ->
  `musicjax import-heartmula` -> `musicjax export`."""
  tmp = tmp_path_factory.mktemp('heartmula')
  src = imp_test.released(tmp / 'released')
  run, out = str(tmp / 'run'), str(tmp / 'export')
  assert cli.main(['import-heartmula', '--from', src, '--workdir', run,
                   '--config', TINY]) == 0
  assert cli.main(['export', '--workdir', run, '--out', out]) == 0
  return out


def load():
  """The JAX model of the fixture (equal to the imported run's,
  tests/test_import_heartmula.py) and its config."""
  return hw.load(FIXTURE, cfg.load(TINY))


@pytest.fixture(scope='module')
def loaded():
  return load()


# ------------------------------------------------------------------ helpers
def to_torch(arrays: dict) -> dict:
  return {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}


def to_jax(arrays: dict) -> dict:
  return {k: jnp.asarray(v) for k, v in arrays.items()}


def max_err(got, want) -> float:
  """max |got - want|; infinities (barred classes) at the same places."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  finite = np.isfinite(want)
  np.testing.assert_array_equal(got[~finite], want[~finite])
  return float(np.max(np.abs(got[finite] - want[finite])))


def assert_close(got, want, tol: float, what: str) -> None:
  err = max_err(got, want)
  assert err <= tol, f'{what}: max abs error {err:.3g} > {tol}'


def fixture_batch(ref, k: int) -> dict:
  """heartlib's teacher-forced inputs as our slot batch: row 0 conditional
  with its reference embedding, row 1 the unconditional (CFG) row."""
  tokens, mask = ref['tokens'], ref['tokens_mask']
  text = np.where(mask[..., -1], tokens[..., -1], layout.EMPTY)
  text[:, int(ref['ref_slot'])] = layout.REF_SLOT
  audio = np.where(mask[..., :k], tokens[..., :k], layout.EMPTY)
  b, s = text.shape
  return {'text': text.astype(np.int32), 'audio': audio.astype(np.int32),
          'positions': ref['positions'].astype(np.int32),
          'valid': np.ones((b, s), bool), 'ref_embed': ref['muq'],
          'ref_valid': np.ones((b,), bool), 'uncond': ref['uncond_mask']}


def padded_batch(ref, k: int) -> dict:
  """The fixture batch plus a third row: conditional, its reference not
  given, right-padded after 4 frames, one frame holding special rows
  (codebook_size .. audio_vocab_size - 1) and an END slot."""
  b = fixture_batch(ref, k)
  p = int(ref['prompt_len'])
  row = {key: b[key][:1].copy() for key in b}
  row['audio'][0, p + 2, 3:] = np.arange(16, 21)
  row['audio'][0, p + 4] = layout.EMPTY
  row['audio'][0, p + 4, 0] = 17                      # END
  row['valid'][0, p + 5:] = False
  row['ref_valid'][:] = False
  row['uncond'][:] = False
  return {key: np.concatenate([b[key], row[key]]) for key in b}


def with_heads_cut(model, c, keep_end=()):
  """The head columns of classes >= END zeroed (as the fixture script did
  for heartlib's decode), except in the codebooks `keep_end`."""
  end = model_lib.end_id(c.model)
  if 0 not in keep_end:
    model.head0[...] = model.head0[...].at[:, end:].set(0.0)
  heads = model.local_heads[...]
  for i in range(1, c.model.num_codebooks):
    if i not in keep_end:
      heads = heads.at[i - 1, :, end:].set(0.0)
  model.local_heads[...] = heads
  return model


def export(model, c, out, dtype='float32') -> str:
  """`musicjax export`'s writer on a JAX model."""
  export_lib.export_model(model, c, str(out), dtype=dtype)
  return str(out)


def fixture_prompt(ref, c) -> dict:
  """reference.npz's prompt slots through the prompt builder (cond + uncond
  rows, the fixture's reference embedding)."""
  p, slot = int(ref['prompt_len']), int(ref['ref_slot'])
  tokens = ref['tokens'][0, :p, -1]
  return hp.build(c.model, tokens[:slot].tolist(), tokens[slot + 1:].tolist(),
                  cfg=True, ref_embed=ref['muq'][0])


def jax_decode(model, c, inputs, frames, scale, teacher=None, min_frames=0):
  sampling = G.sampling_from_config(
      c.sample, cfg_scale=float(scale), temperature=0.0, max_frames=frames,
      min_frames=min_frames, end_id=model_lib.end_id(c.model))
  num_cond = 1
  fn = jax.jit(lambda m, pr, r, rv, t: G.generate(
      m, pr, rng=jax.random.key(0), sampling=sampling, num_cond=num_cond,
      ref_codes=r, ref_valid=rv, teacher=t, record_logits=True))
  out = fn(model, to_jax(inputs['prompt']), jnp.asarray(inputs['ref_embed']),
           jnp.asarray(inputs['ref_valid']),
           None if teacher is None else jnp.asarray(teacher, jnp.int32))
  return {k: np.asarray(v) for k, v in out.items()}


def torch_decode(model, inputs, frames, scale, teacher=None, min_frames=0):
  return model.generate(
      to_torch(inputs['prompt']), max_frames=frames, cfg_scale=float(scale),
      temperature=0.0, num_cond=1, min_frames=min_frames,
      ref_codes=torch.as_tensor(inputs['ref_embed']),
      ref_valid=torch.as_tensor(inputs['ref_valid']),
      teacher=None if teacher is None else torch.as_tensor(teacher),
      record_logits=True)


def assert_same_decode(got, want) -> None:
  np.testing.assert_array_equal(got['num_frames'].numpy(), want['num_frames'])
  np.testing.assert_array_equal(got['codes'].numpy(), want['codes'])
  for key in ('logits_global', 'logits_local'):
    assert_close(got[key].numpy(), want[key], TOL, key)


# ------------------------------------------------------------------ forward
def test_export_facts_and_layout(exported):
  """config.json carries the released END and no LM extra tokens; the
  PyTorch model has the released tables (21 rows, 64 text rows, one
  unconditional row, an 8 -> 32 biased reference linear, no melody)."""
  with open(os.path.join(exported, 'config.json')) as f:
    meta = json.load(f)
  assert meta['end_id'] == 17 and meta['extra_ids'] == {}
  model = musicjax_torch.from_pretrained(exported)
  assert model.end_id == 17 and model.ref_id == layout.REF_SLOT
  state = model.state_dict()
  assert tuple(state['audio_embed.0.weight'].shape) == (21, 32)
  assert tuple(state['text_embed.weight'].shape) == (64, 32)
  assert tuple(state['uncond_embed'].shape) == (32,)
  assert tuple(state['ref_proj.weight'].shape) == (32, 8)
  assert tuple(state['ref_proj.bias'].shape) == (32,)
  assert tuple(state['head0.weight'].shape) == (21, 32)
  assert tuple(state['local_heads.6.weight'].shape) == (21, 16)
  assert not any(n.startswith('melody_embed') for n in state)
  # An export written before the fact followed model.end_id still decodes
  # with the config's END.
  meta['end_id'] = meta['model']['codebook_size']
  assert torch_io.build(meta).end_id == 17


def test_forward_logits_match_jax_and_heartlib(exported, loaded, ref):
  """Teacher-forced logits of a conditional row with its reference, the
  unconditional row, and a padded row without a reference whose frames hold
  special rows and END."""
  model, c = loaded
  tm = musicjax_torch.from_pretrained(exported)
  batch = padded_batch(ref, c.model.num_codebooks)
  want = model(to_jax(batch))
  with torch.no_grad():
    got = tm(to_torch(batch))
  assert set(got) == set(want)
  np.testing.assert_array_equal(got['local_index'].numpy(),
                                np.asarray(want['local_index']))
  for key in ('global', 'local'):
    assert_close(got[key].numpy(), np.asarray(want[key]), TOL, key)
  # heartlib's own codebook-0 logits of the two fixture rows.
  assert_close(got['global'][:2].numpy(), ref['codebook0_logits'],
               HEARTLIB_TOL, 'codebook-0 logits vs heartlib')
  # The comparison sees the Llama-3 scaling: unscaled rotary phases miss.
  meta = copy.deepcopy(tm.export_config)
  for stack in ('backbone', 'local'):
    meta['model'][stack]['rope_scaling'] = 'none'
  plain = torch_io.build(meta)
  plain.load_state_dict(tm.state_dict())
  with torch.no_grad():
    off = plain.eval()(to_torch(batch))
  assert max_err(off['global'].numpy(), np.asarray(want['global'])) > 100 * TOL


def test_bfloat16_export_is_close(loaded, ref, tmp_path):
  model, c = loaded
  tm = musicjax_torch.from_pretrained(export(model, c, tmp_path / 'bf16',
                                             'bfloat16'))
  assert tm.uncond_embed.dtype == torch.bfloat16
  batch = padded_batch(ref, c.model.num_codebooks)
  want = model(to_jax(batch))
  with torch.no_grad():
    got = tm(to_torch(batch))
  for key in ('global', 'local'):
    scale = float(np.max(np.abs(np.asarray(want[key]))))
    assert got[key].dtype == torch.float32
    assert_close(got[key].numpy(), np.asarray(want[key]), BF16_REL * scale, key)
  out = torch_decode(tm, fixture_prompt(ref, c), 4, 1.5, min_frames=4)
  assert out['num_frames'].tolist() == [4]


# ----------------------------------------------------------------- decoding
def test_greedy_guided_decode_equals_jax_and_heartlib(ref, dec, tmp_path):
  """heartlib's pipeline loop (greedy, CFG 1.5, 20 frames; END+ columns of
  the heads cut as the fixture did): the same codes and guided logits from
  PyTorch, JAX and heartlib."""
  model, c = load()
  model = with_heads_cut(model, c)
  tm = musicjax_torch.from_pretrained(export(model, c, tmp_path / 'cut'))
  inputs = fixture_prompt(ref, c)
  frames, scale = dec['greedy_frames'], dec['cfg_scale']
  n = len(frames)
  got = torch_decode(tm, inputs, n, scale)
  want = jax_decode(model, c, inputs, n, scale)
  assert got['num_frames'].tolist() == [n]
  np.testing.assert_array_equal(got['codes'][0].numpy(), frames)
  assert_same_decode(got, want)
  lg = dec['greedy_logits']
  assert_close(got['logits_global'][0, :n].numpy(), lg[:, 0], HEARTLIB_TOL,
               'codebook-0 guided logits vs heartlib')
  assert_close(got['logits_local'][0, :n].numpy(), lg[:, 1:], HEARTLIB_TOL,
               'local guided logits vs heartlib')


def test_any_code_at_or_above_end_stops(loaded, tmp_path):
  """A teacher frame with a special row above END in one local codebook
  only ends the song there (every head keeps its END+ columns)."""
  model, c = loaded
  tm = musicjax_torch.from_pretrained(export(model, c, tmp_path / 'full'))
  k, end = c.model.num_codebooks, model_lib.end_id(c.model)
  inputs = hp.build(c.model, [1, 2, 3], [4, 5], cfg=False)
  teacher = (np.arange(TEACHER_FRAMES * k).reshape(1, TEACHER_FRAMES, k)
             % c.model.codebook_size)
  teacher[0, TEACHER_STOP, TEACHER_BOOK] = end + 2
  got = torch_decode(tm, inputs, TEACHER_FRAMES, 1.0, teacher=teacher)
  want = jax_decode(model, c, inputs, TEACHER_FRAMES, 1.0, teacher=teacher)
  assert got['num_frames'].tolist() == [TEACHER_STOP]
  assert_same_decode(got, want)


def test_text_prompt_stop_and_min_frames(dec, tmp_path):
  """heartlib's decode of its text prompt stops after one frame (frame 1
  holds END+ in codebook 4 only): so does PyTorch's. With min_frames no
  class >= END is left in any head before that many frames."""
  model, c = load()
  model = with_heads_cut(model, c, keep_end=(STOP_BOOK,))
  tm = musicjax_torch.from_pretrained(export(model, c, tmp_path / 'stop'))
  tokens, slot = dec['text_prompt'].tolist(), int(dec['text_ref_slot'])
  inputs = hp.build(c.model, tokens[:slot], tokens[slot + 1:], cfg=True)
  end, scale = model_lib.end_id(c.model), dec['cfg_scale']
  early = torch_decode(tm, inputs, MIN_FRAMES, scale)
  assert early['num_frames'].tolist() == [1]
  np.testing.assert_array_equal(early['codes'][0, :1].numpy(),
                                dec['text_frames'])
  assert_close(early['logits_global'][0, :2].numpy(), dec['text_logits'][:, 0],
               HEARTLIB_TOL, 'codebook-0 guided logits vs heartlib')
  assert_close(early['logits_local'][0, :2].numpy(), dec['text_logits'][:, 1:],
               HEARTLIB_TOL, 'local guided logits vs heartlib')
  assert_same_decode(early, jax_decode(model, c, inputs, MIN_FRAMES, scale))
  got = torch_decode(tm, inputs, MIN_FRAMES, scale, min_frames=MIN_FRAMES)
  want = jax_decode(model, c, inputs, MIN_FRAMES, scale, min_frames=MIN_FRAMES)
  assert got['num_frames'].tolist() == [MIN_FRAMES]
  assert int(got['codes'].max()) < end
  assert torch.all(got['logits_local'][:, :MIN_FRAMES, :, end:] == -float('inf'))
  assert_same_decode(got, want)


# --------------------------------------------------------------- round trip
def test_round_trip_through_torch_is_bit_exact(exported, loaded, tmp_path):
  model, c = loaded
  tm = musicjax_torch.from_pretrained(exported)
  out = str(tmp_path / 'from_torch')
  musicjax_torch.save_pretrained(tm, out)
  with nnx.use_eager_sharding(False):
    fresh = model_lib.AudioLM(c.model, nnx.Rngs(1))
  import_torch.load_into(fresh, 'lm', out)
  want, got = export_lib.state_paths(model), export_lib.state_paths(fresh)
  assert set(got) == set(want)
  for p in want:
    np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]),
                                  err_msg=p)


# ------------------------------------------------------------------ refusal
@pytest.mark.parametrize('key,value,named', [
    ('reference', 'clap', 'model.reference'),
    ('variant', 'decoder_only', 'model.variant'),
    ('backbone.rope_scaling', 'yarn', 'model.backbone.rope_scaling'),
    ('local.rope_scaling', 'yarn', 'model.local.rope_scaling'),
    # MusicGen's blocks (musicjax/nn/transformer.py), not mirrored here.
    ('backbone.norm', 'layer', 'model.backbone.norm'),
    ('local.cross_attention', True, 'model.local.cross_attention'),
])
def test_an_option_not_mirrored_is_refused_by_name(exported, key, value, named):
  with open(os.path.join(exported, 'config.json')) as f:
    meta = json.load(f)
  *parents, leaf = key.split('.')
  node = meta['model']
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=named):
    torch_lm.AudioLM.from_config(meta)
