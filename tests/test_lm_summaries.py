"""The LM's TensorBoard summaries: a generated clip and the spectrograms of it
and the reference, decoded with the token set's codec; token images without
a codec; the generation traced once per run; a failing summary does not stop
training."""
import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest
from flax import nnx

from musicjax import config as config_lib
from musicjax.prepare import tokens as prepare_tokens
from musicjax.data import token_records
from musicjax.codec import dataset_codec as common
from musicjax.lm import generate as gen
from musicjax.lm import layout
from musicjax.lm import sequence
from musicjax.lm import summaries
from musicjax.lm import synthetic
from musicjax.lm import task as lm_task
from musicjax.lm.data import audio_slots
from musicjax.parallel import rules as rules_lib
from musicjax.train import trainer
from tests import audio_fixtures as fx
from tests import codec_fixtures as cf
from tests import lm_fixtures as lf
from tests import toy_task

SR = 8000             # codec_fixtures.small_config: hop 16 -> 500 frames/s
SECONDS = 0.6
CLIP_SECONDS = 0.1    # config.summary.seconds: 50 frames, 800 samples
TOY = os.path.join(os.path.dirname(__file__), 'configs', 'toy.py')


def summary_values(workdir):
  """{tag: [(step, value proto)]} from the TensorBoard event files."""
  from tensorboardX.proto import event_pb2
  out = {}
  for name in os.listdir(workdir):
    if not name.startswith('events.out.tfevents'):
      continue
    with open(os.path.join(workdir, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack('<Q', data[pos:pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      for v in ev.summary.value:
        out.setdefault(v.tag, []).append((ev.step, v))
      pos += 12 + n + 4
  return out


def wav_samples(audio_proto) -> np.ndarray:
  import io
  import soundfile as sf
  wave, sr = sf.read(io.BytesIO(audio_proto.encoded_audio_string))
  assert sr == audio_proto.sample_rate
  return wave


@pytest.fixture(scope='module')
def token_set(tmp_path_factory):
  """(tmp, token dir, dataset.json) made by an untrained tiny codec."""
  tmp = tmp_path_factory.mktemp('lm_summaries')
  src = str(tmp / 'songs')
  for i, name in enumerate(('a', 'b', 'c', 'd', 'e')):
    fx.write(os.path.join(src, f'{name}.wav'),
             fx.tone(SECONDS, SR, 220.0 * 2 ** (i / 12)), SR)
  with open(os.path.join(src, 'c.json'), 'w', encoding='utf-8') as f:
    json.dump({'tags': 'genre: pop; mood: happy',
               'lyrics': '[Verse]\nla la la'}, f)
  c = cf.small_config()
  c.data.kind, c.data.path, c.data.eval_fraction = 'folder', src, 0.3
  c.data.batch_size = c.data.eval_batch_size = 8
  c.data.records_per_shard = 2
  cf.untrained_run(c, str(tmp / 'codec'))
  tokens = str(tmp / 'tokens')
  prepare_tokens.prepare_tokens_main(str(tmp / 'codec'), tokens, c)
  return tmp, tokens, token_records.read_dataset_info(tokens)


def token_config(tokens, info, steps=2):
  c = lf.small_config()
  m = c.model
  m.num_codebooks, m.codebook_size = info['num_codebooks'], info['codebook_size']
  m.text_vocab_size = 1024
  m.max_seq_len = 400
  d = c.data
  d.kind, d.path = 'tokens', tokens
  d.max_frames, d.max_text_tokens, d.reference_frames = 32, 48, 8
  d.batch_size = d.eval_batch_size = 8
  tr = c.train
  tr.steps, tr.log_every, tr.checkpoint_every = steps, 1, steps
  tr.eval_every, tr.eval_steps = 2, 1
  c.sample.top_k = 8
  c.sample.cfg_scale = 1.5          # guided: the null-condition row is built too
  c.summary.seconds = CLIP_SECONDS
  return c


def count_traces(monkeypatch):
  traces = []
  real = gen.generate

  def counted(*args, **kwargs):
    traces.append(1)
    return real(*args, **kwargs)
  monkeypatch.setattr(gen, 'generate', counted)
  return traces


@pytest.mark.slow
def test_eval_steps_write_a_generated_clip_and_spectrograms(token_set, tmp_path,
                                                           monkeypatch):
  _, tokens, info = token_set
  traces = count_traces(monkeypatch)
  wd = str(tmp_path / 'lm')
  trainer.train(token_config(tokens, info, steps=4), wd)
  values = summary_values(wd)
  hop = info['hop_length']
  for tag in ('audio/generated', 'audio/reference', 'image/spectrogram'):
    assert [s for s, _ in values[tag]] == [2, 4], (tag, values.keys())
  assert 'image/tokens' not in values
  for _, v in values['audio/generated']:
    assert v.audio.sample_rate == SR == info['sample_rate']
    wave = wav_samples(v.audio)
    assert len(wave) == round(CLIP_SECONDS * info['frame_rate']) * hop
    assert np.abs(wave).max() > 0
  # The reference is the first eval window: max_frames frames of the song.
  ref = [wav_samples(v.audio) for _, v in values['audio/reference']]
  assert len(ref[0]) == 32 * hop and np.array_equal(ref[0], ref[1])
  for _, v in values['image/spectrogram']:
    assert v.image.height > 100 and v.image.width > 100
  # Two summaries, one trace of the generation loop.
  assert len(traces) == 1


def test_example_parts_recover_prompt_frames_and_melody():
  """Frames and their melody come back from the slots, in both layouts."""
  rng = np.random.default_rng(0)
  c = lf.small_config(layout_name='interleaved', max_text_tokens=12)
  head = lf.text_ids(c, 3, rng)
  f1, f2 = lf.frames(c, 5, rng), lf.frames(c, 4, rng)
  m1, m2 = lf.melody(5, rng), lf.melody(4, rng)
  parts = [sequence.TextPart(head + [lf.audio_id(c)]),
           sequence.AudioPart(f1, m1, True, int(m2[0])),
           sequence.TextPart(lf.text_ids(c, 2, rng) + [lf.audio_id(c)]),
           sequence.AudioPart(f2, m2, True)]
  ex = sequence.assemble(parts, 40, c.model.num_codebooks, c.model.codebook_size)
  got = summaries.example_parts(c, {k: v[None] for k, v in ex.items()})
  np.testing.assert_array_equal(got['frames'], np.concatenate([f1, f2]))
  np.testing.assert_array_equal(got['melody'], np.concatenate([m1, m2]))
  np.testing.assert_array_equal(got['prompt']['text'], head + [lf.audio_id(c)])
  # single_stream: the delay pattern's steps are reverted to frames, END cut.
  c = lf.small_config('single_stream')
  codes = synthetic.MarkovSpec(16, 3, 2, (2, 1)).sample(6, rng)
  mel = lf.melody(6, rng)
  ex = sequence.assemble([sequence.TextPart([lf.audio_id(c)]),
                          audio_slots(c, codes, mel, True)], 24, 3, 16)
  got = summaries.example_parts(c, {k: v[None] for k, v in ex.items()})
  np.testing.assert_array_equal(got['frames'], codes)
  np.testing.assert_array_equal(got['melody'], mel)


def _state_and_batch(c):
  s = trainer.setup(c)
  batch = next(iter(s.task.dataset('eval', 0, 1)))
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    return s, nnx.merge(s.graphdef, trainer.init_state(s)), batch


def test_synthetic_tokens_give_token_images_without_audio(tmp_path, capsys):
  c = lf.small_config()
  c.data.batch_size = c.data.eval_batch_size = 8
  tr = c.train
  tr.steps, tr.log_every, tr.checkpoint_every, tr.eval_every = 2, 1, 2, 2
  tr.eval_steps = 1
  wd = str(tmp_path / 'lm')
  trainer.train(c, wd)
  values = summary_values(wd)
  assert [s for s, _ in values['image/tokens']] == [2]
  assert not [t for t in values if t.startswith('audio/')]
  assert 'image/spectrogram' not in values
  assert 'summaries failed' not in capsys.readouterr().err


def test_summaries_on_an_explicit_mesh_generate_what_an_auto_mesh_does():
  """A run on config.mesh.axis_type='explicit' (fsdp 2): the eval-time clip
  is generated (decoding failed there with a ShardingTypeError, and the
  trainer logged 'summaries failed'), the same tokens as on an Auto mesh."""
  images = {}
  for axis_type in ('auto', 'explicit'):
    c = lf.small_config()
    c.data.batch_size = c.data.eval_batch_size = 8
    c.mesh.axis_type, c.mesh.data, c.mesh.fsdp = axis_type, 4, 2
    s, module, batch = _state_and_batch(c)
    with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
      out = s.task.summaries(module, batch, jax.random.key(3))
    images[axis_type] = out['image/tokens']
  np.testing.assert_array_equal(images['explicit'], images['auto'])


@pytest.mark.slow
def test_a_codec_that_is_gone_gives_token_images_and_says_why(token_set, tmp_path,
                                                              capsys):
  _, tokens, info = token_set
  moved = str(tmp_path / 'tokens')
  shutil.copytree(tokens, moved)
  info = dict(info, codec_workdir=str(tmp_path / 'no_codec'))
  with open(os.path.join(moved, token_records.DATASET_INFO), 'w') as f:
    json.dump(info, f)
  c = token_config(moved, info)
  s, module, batch = _state_and_batch(c)
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    for step in (1, 2):
      out = s.task.summaries(module, batch, jax.random.key(step))
      assert sorted(out) == ['image/tokens'], out.keys()
      img = out['image/tokens']
      assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
  err = capsys.readouterr().err
  # Said once, with the reason, not at every eval.
  assert err.count('token images instead') == 1, err
  assert 'no_codec' in err and 'not there' in err


def test_a_failing_summary_is_logged_and_training_goes_on(tmp_path, capsys,
                                                          monkeypatch):
  def broken(self, state, batch, rng):
    raise RuntimeError('no speakers attached')
  monkeypatch.setattr(toy_task.ToyTask, 'summaries', broken)
  c = config_lib.load(TOY, ['train.steps=4', 'train.log_every=2',
                            'train.eval_every=2', 'train.checkpoint_every=4'])
  last = trainer.train(c, str(tmp_path))
  assert last['step'] == 4 and np.isfinite(last['eval/loss'])
  err = capsys.readouterr().err
  assert err.count('summaries failed, training goes on') == 2, err
  assert 'RuntimeError: no speakers attached' in err
  assert 'test_lm_summaries.py' in err    # where it was raised


def test_spectrograms_of_different_lengths_share_the_longest_time_axis():
  from musicjax.eval import plots
  fig = plots.spectrogram_figure({'a': np.zeros(800), 'b': np.zeros(512)}, SR)
  for ax in fig.axes:
    assert ax.get_xlim() == pytest.approx((0.0, 0.1))


def test_summary_seconds_is_checked_and_zero_writes_nothing():
  import types
  from musicjax.config import ConfigError
  c = lf.small_config()
  c.summary.seconds = 0.0
  state = types.SimpleNamespace(model=None)   # never run: nothing to write
  assert lm_task.LMTask(c).summaries(state, {}, None) == {}
  c.summary.seconds = -1.0
  with pytest.raises(ConfigError, match='config.summary.seconds'):
    lm_task.LMTask(c)


def test_dpo_summaries_show_the_policy_beside_the_winner(monkeypatch):
  small = lf.small_config()
  c = config_lib.for_task('lm_dpo')
  c.model = small.model
  c.data.update(small.data)
  c.data.batch_size = c.data.eval_batch_size = 8
  rng = np.random.default_rng(0)
  n = c.data.max_frames
  sides = {side: lf.frames(c, n, rng) for side in ('winner', 'loser')}
  batch = {}
  for side, codes in sides.items():
    ex = sequence.assemble(
        [sequence.TextPart([lf.audio_id(c)]),
         sequence.AudioPart(codes, lf.melody(n, rng), False)],
        layout.seq_len(c), c.model.num_codebooks,
        c.model.codebook_size)
    batch.update({f'{side}/{k}': np.stack([v] * 8) for k, v in ex.items()})
  shown = {}
  monkeypatch.setattr(common, 'token_image',
                      lambda grids, v: shown.update(grids) or np.zeros((2, 2, 3)))
  s = trainer.setup(c)
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    module = nnx.merge(s.graphdef, trainer.init_state(s))
    out = s.task.summaries(module, batch, jax.random.key(0))
  assert sorted(out) == ['image/tokens']
  np.testing.assert_array_equal(shown['reference'], sides['winner'])
  assert shown['generated'].shape == (n, c.model.num_codebooks)
