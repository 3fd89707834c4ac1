"""MusicGen-Melody fine-tuning data: `prepare --chroma` stores every song's
chroma classes at the feature extractor's settings, training windows read
the frames the extractor would give the window's own audio, the model sees
them (the loss moves), and data without chroma is refused with the fix.

The tiny MusicGen-Melody, its 8 kHz EnCodec (hop 16) and its extractor
(n_fft 1024, hop 256) come from test_import_musicgen_melody.
"""
import json
import os

import numpy as np
import pytest
import soundfile as sf

from musicjax import cli
from musicjax.data import token_records
from musicjax.lm import musicgen_chroma
from musicjax.train import runs

import test_import_musicgen_melody as MM

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

TINY = MM.TINY
CODEC_HOP = MM.HOP


def _extractor_ids(wave):
  s = TINY
  return MM._extractor(s)(wave, sampling_rate=s.sampling_rate,
                          return_tensors='np')['input_features'][0].argmax(-1)


@pytest.mark.parametrize('start, seconds', [
    (256 * 7, 1.5),     # on the chroma grid
    (16 * 101, 1.2),    # a codec frame between two chroma frames
    (256 * 3, 0.08)])   # shorter than n_fft: padded, as the extractor does
def test_a_window_gets_the_extractors_frames_of_its_own_audio(start, seconds):
  """Song-level classes, windowed, against the extractor on the window's
  audio: every frame at least two hops from the window's edges is the same
  (at the edges the extractor reflect-pads where the song has real audio);
  off the grid, the nearest frame is taken and most frames still agree."""
  wave = MM.chords(TINY.sampling_rate, 4.0, seed=3)
  song = musicgen_chroma.classes(wave, TINY, cut=False)
  assert len(song) == 1 + len(wave) // TINY.hop_length
  clip = wave[start:start + int(seconds * TINY.sampling_rate)]
  want = _extractor_ids(clip)
  got = musicgen_chroma.window(song, start / TINY.sampling_rate, seconds, TINY,
                               len(want))
  assert got.shape == want.shape
  if start % TINY.hop_length == 0 and len(want) > 8:
    np.testing.assert_array_equal(got[2:-2], want[2:-2])
  agree = float(np.mean(got == want))
  print('agreement', start, seconds, agree)
  assert agree >= (0.7 if len(want) > 8 else 0.6), (got, want)


def test_window_repeats_and_cuts_to_the_prefix_length():
  song = np.arange(40) % 12
  short = musicgen_chroma.window(song, 0.0, 0.1, TINY, 13)   # 5 frames
  np.testing.assert_array_equal(short, np.tile(song[:5], 3)[:13])
  long = musicgen_chroma.window(song, 0.5, 1.0, TINY, 8)     # cut
  first = round(0.5 * TINY.sampling_rate / TINY.hop_length)
  np.testing.assert_array_equal(long, song[first:first + 8])
  # Past the song's end: its last frame, never an empty window.
  np.testing.assert_array_equal(
      musicgen_chroma.window(song, 99.0, 1.0, TINY, 3), [song[-1]] * 3)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """An imported tiny MusicGen-Melody, and a folder of chord songs prepared
  with its codec twice: with --chroma and without."""
  root = tmp_path_factory.mktemp('melody_data')
  folder = str(root / 'release')
  os.makedirs(folder)
  MM.tiny_melody(folder)
  run = str(root / 'run')
  assert cli.main(['import-musicgen', '--from', folder, '--workdir', run]) == 0
  songs = root / 'songs'
  songs.mkdir()
  waves = {}
  for i in range(6):
    w = MM.chords(MM.SR, 2.0 + 0.25 * i, seed=10 + i)
    sf.write(str(songs / f'song{i}.wav'), w, MM.SR, subtype='FLOAT')
    waves[f'song{i}'] = w
  data = ['--config.data.kind=folder', f'--config.data.path={songs}',
          '--config.data.eval_fraction=0.34']
  with_chroma, without = str(root / 'tokens'), str(root / 'plain')
  codec = os.path.join(run, 'codec')
  assert cli.main(['prepare', '--codec-workdir', codec, '--out', with_chroma,
                   '--chroma'] + data) == 0
  assert cli.main(['prepare', '--codec-workdir', codec, '--out', without]
                  + data) == 0
  return run, with_chroma, without, waves


def _records(out):
  recs = []
  for split in ('train', 'eval'):
    src = token_records.source(out, split)
    recs += [src[i] for i in range(len(src))]
  return recs


def test_prepare_stores_each_songs_chroma_at_the_runs_settings(prepared):
  """dataset.json holds the settings import-musicgen kept beside the codec,
  and each record the classes of the whole song at those settings."""
  run, out, plain, waves = prepared
  with open(os.path.join(out, token_records.DATASET_INFO)) as f:
    info = json.load(f)
  assert musicgen_chroma.ChromaSettings(**info['chroma']) == TINY
  recs = _records(out)
  assert len(recs) == len(waves)
  for r in recs:
    name = os.path.splitext(os.path.basename(r['meta']['origin']))[0]
    want = musicgen_chroma.classes(waves[name], TINY, cut=False)
    np.testing.assert_array_equal(r[token_records.CHROMA_KEY], want)
  assert all(token_records.CHROMA_KEY not in r for r in _records(plain))
  with open(os.path.join(plain, token_records.DATASET_INFO)) as f:
    assert json.load(f)['chroma'] is None


def _config(run, data, **cond):
  c = runs.saved_config(run, 'lm')
  c.data.path = data
  c.data.batch_size = c.data.eval_batch_size = 2
  c.cond.drop_all = 0.0
  for k, v in cond.items():
    c.cond[k] = v
  return c


def test_training_windows_read_the_chroma_and_the_model_sees_it(prepared):
  """An eval window (the song's start) carries the window's chroma; a
  dropped melody is the null chroma; and the loss on the batch changes
  when its chroma is swapped for the null one."""
  import jax
  from musicjax.lm import data as lm_data
  from musicjax.lm import token_data
  from musicjax.lm import task as task_lib
  run, out, _, _ = prepared
  c = _config(run, out, drop_melody=0.0)
  rec = _records(out)[0]
  ex = token_data.Example(c, float(MM.SR / CODEC_HOP), train=False)(
      rec, np.random.default_rng(0))
  frames = min(c.data.max_frames, len(rec['codes']))
  want = musicgen_chroma.window(rec[token_records.CHROMA_KEY], 0.0,
                                frames * CODEC_HOP / MM.SR, TINY,
                                MM.CHROMA_LENGTH)
  np.testing.assert_array_equal(ex['chroma'].argmax(-1), want)
  assert ex['chroma'].shape == (MM.CHROMA_LENGTH, 12)
  assert (want != 0).any()                    # a real melody, not the null one
  c.cond.drop_melody = 1.0
  dropped = token_data.Example(c, float(MM.SR / CODEC_HOP), train=True)(
      rec, np.random.default_rng(0))
  np.testing.assert_array_equal(dropped['chroma'], lm_data.chroma(c)['chroma'])

  c.cond.drop_melody = 0.0
  # A damaged record's class is named; the pipeline reports it and goes on.
  from musicjax.data import song_text
  bad = dict(rec, chroma=np.full_like(rec[token_records.CHROMA_KEY], 40))
  with pytest.raises(song_text.BadSongMetadata, match='chroma class 40'):
    token_data.Example(c, float(MM.SR / CODEC_HOP), train=False)(
        bad, np.random.default_rng(0))
  task = task_lib.LMTask(c)
  batch = next(iter(task.dataset('eval', 0, 1)))
  assert batch['chroma'].shape == (2, MM.CHROMA_LENGTH, 12)
  model = runs.load_run(run, expect='lm').model
  loss = lambda b: float(task._loss(model, jax.tree.map(np.asarray, b))[0])
  null = dict(batch, chroma=np.broadcast_to(lm_data.chroma(c)['chroma'],
                                            batch['chroma'].shape))
  with_melody, without = loss(batch), loss(null)
  print('loss with the chroma', with_melody, 'with the null chroma', without)
  assert abs(with_melody - without) > 1e-3


def test_train_needs_chroma_or_no_melody(prepared, tmp_path, capsys):
  """Data prepared without --chroma: `train` names the two fixes; with
  --config.cond.melody=False it trains (text only); data with chroma trains
  with melodies."""
  import shutil
  run, out, plain, _ = prepared
  steps = ['--config.train.steps=2',
           '--config.train.log_every=1', '--config.train.checkpoint_every=2',
           '--config.train.eval_every=1000', '--config.data.batch_size=8',
           '--config.data.eval_batch_size=8']
  work = str(tmp_path / 'a')
  shutil.copytree(run, work)
  assert cli.main(['train', '--workdir', work, f'--config.data.path={plain}']
                  + steps) != 0
  err = capsys.readouterr().err
  assert 'no melody chroma' in err and '--chroma' in err
  assert 'cond.melody=False' in err
  assert cli.main(['train', '--workdir', work, f'--config.data.path={plain}',
                   '--config.cond.melody=False'] + steps) == 0
  work = str(tmp_path / 'b')
  shutil.copytree(run, work)
  assert cli.main(['train', '--workdir', work, f'--config.data.path={out}']
                  + steps) == 0


def test_chroma_flag_errors_name_the_file(prepared, tmp_path, capsys):
  run, _, _, _ = prepared
  assert cli.main(['prepare', '--codec-workdir', os.path.join(run, 'codec'),
                   '--out', str(tmp_path / 'x'), '--chroma',
                   str(tmp_path / 'nope.json')]) != 0
  err = capsys.readouterr().err
  assert 'nope.json' in err and 'no such file' in err
