"""A user's small, messy folder: bad files in either split, truncated files,
evaluation that is not needed, and a split too small to evaluate."""
import os

import numpy as np
import pytest
import soundfile as sf

from musicjax.data import audio
from musicjax.data import sources
from musicjax.errors import UserError
from musicjax.train import checkpoint as ckpt_lib
from musicjax.train import metrics as metrics_lib
from musicjax.train import trainer
from tests import audio_fixtures as fx
from tests import codec_fixtures as cf

SR = 8000  # codec_fixtures.small_config
EVAL_FRACTION = 0.3


def _truncated_flac(path, seconds=1.0):
  """A FLAC cut in half: its header still promises every frame."""
  x = (np.random.default_rng(0).standard_normal(int(seconds * SR)) * 0.1)
  sf.write(path, x.astype(np.float32), SR, format='FLAC')
  with open(path, 'rb') as f:
    raw = f.read()
  with open(path, 'wb') as f:
    f.write(raw[:len(raw) // 2])
  return path


def _split_of(name, root):
  return ('eval' if sources._hash_fraction(os.path.relpath(name, root)) <  # pylint: disable=protected-access
          EVAL_FRACTION else 'train')


def _messy_folder(root, good=3):
  """`good` good wavs, all hashing to train, and bad files that hash to eval:
  a truncated FLAC (passes a header check), an empty and a junk wav."""
  os.makedirs(root)
  names, bad, i = [], [], 0
  while len(names) < good or len(bad) < 3:
    i += 1
    split = _split_of(os.path.join(root, f'f{i:03d}.wav'), root)
    if split == 'train' and len(names) < good:
      names.append(fx.write(os.path.join(root, f'f{i:03d}.wav'),
                            fx.tone(1.0, SR, 200.0 + 40 * len(names)), SR))
    elif split == 'eval' and _split_of(os.path.join(root, f'f{i:03d}.flac'),
                                       root) == 'eval' and len(bad) < 3:
      p = os.path.join(root, f'f{i:03d}.flac' if not bad else f'f{i:03d}.wav')
      if p.endswith('.flac'):
        _truncated_flac(p)
      else:
        with open(p, 'wb') as f:
          f.write(b'' if len(bad) == 1 else b'RIFF\0\0\0\0WAVEjunk' * 9)
      bad.append(p)
  return names, bad


def _codec_config(path, **train):
  c = cf.folder_run_config(path, EVAL_FRACTION)
  c.train.eval_steps, c.train.eval_at_start = 1, True  # as configs/codec/tiny.py
  for k, v in train.items():
    c.train[k] = v
  return c


def test_a_truncated_flac_fails_the_upfront_scan(tmp_path):
  path = _truncated_flac(str(tmp_path / 'cut.flac'))
  assert sf.info(path).frames == SR  # the header alone looks whole
  with pytest.raises(audio.BadAudio, match='truncated'):
    audio.check_file(path)
  whole = fx.write(str(tmp_path / 'whole.flac'), fx.tone(1.0, SR, 300.0), SR)
  assert audio.check_file(whole).frames == SR


def test_bad_files_of_both_splits_are_named_and_a_good_file_moves_to_eval(tmp_path):
  root = str(tmp_path / 'messy')
  good, bad = _messy_folder(root)
  audio.reset_bad_files()
  c = fx.data_config(root, eval_fraction=EVAL_FRACTION)
  train = [it['name'] for it in sources.folder_items(c, 'train')]
  # Every bad file is named, though train's items never include them.
  assert set(fx.bad_under(root)) == set(bad)
  assert 'truncated' in fx.bad_under(root)[bad[0]]
  ev = [it['name'] for it in sources.folder_items(c, 'eval')]
  # The hashed eval files were all bad: the good file with the smallest hash
  # went to eval, and no good file is dropped.
  assert len(ev) == 1 and sorted(train + ev) == sorted(good)
  assert len(fx.bad_under(root)) == len(bad)


def test_a_small_messy_folder_trains_and_evaluates(tmp_path):
  root = str(tmp_path / 'messy')
  good, bad = _messy_folder(root)
  audio.reset_bad_files()
  wd = str(tmp_path / 'run')
  trainer.train(_codec_config(root, eval_every=2), wd)
  rows = metrics_lib.read_jsonl(os.path.join(wd, metrics_lib.METRICS_FILE))
  assert [r['step'] for r in rows if 'eval/mel_distance' in r] == [0, 2]
  assert rows[-1]['data/bad_files'] == len(bad)
  assert set(fx.bad_under(root)) == set(bad)
  del good


def test_a_run_that_never_evaluates_trains_without_an_eval_split(tmp_path):
  root = str(tmp_path / 'one_good')
  os.makedirs(root)
  fx.write(os.path.join(root, 'only.wav'), fx.tone(1.0, SR, 220.0), SR)
  _truncated_flac(os.path.join(root, 'cut.flac'))
  audio.reset_bad_files()
  # eval_every beyond steps (and eval_at_start on): nothing needs the eval split.
  wd = str(tmp_path / 'run')
  trainer.train(_codec_config(root, eval_every=1000), wd)
  rows = metrics_lib.read_jsonl(os.path.join(wd, metrics_lib.METRICS_FILE))
  assert rows and not any('eval/mel_distance' in r for r in rows)
  assert set(fx.bad_under(root)) == {os.path.join(root, 'cut.flac')}

  # A run that does evaluate stops up front, naming the split, counts and fix.
  wd2 = str(tmp_path / 'run2')
  with pytest.raises(UserError) as e:
    trainer.train(_codec_config(root, eval_every=2), wd2)
  msg = str(e.value)
  for part in ("split 'eval'", '2 audio file(s), 1 usable', '1 bad',
               '--config.train.eval_every=0'):
    assert part in msg, msg
  assert not os.path.isdir(ckpt_lib.checkpoint_dir(wd2)) or not os.listdir(
      ckpt_lib.checkpoint_dir(wd2))
