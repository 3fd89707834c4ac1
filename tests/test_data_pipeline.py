"""The Grain pipeline on folders: shapes, bad input, exact resume, sharding."""
import logging
import os

import numpy as np
import pytest

from musicjax.config import ConfigError
from musicjax.data import audio
from musicjax.data import pipeline
from musicjax.data import sources
from tests import audio_fixtures as fx

SR = 8000


def _peak_hz(x: np.ndarray) -> int:
  """The test tones' frequency (they are multiples of 50 Hz)."""
  spectrum = np.abs(np.fft.rfft(x[:, 0]))
  return int(round(np.argmax(spectrum) * SR / x.shape[0] / 50) * 50)


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _bad_folder(root: str) -> dict[str, str]:
  """Writes one file of each bad kind; returns path -> expected reason."""
  bad = {}

  def add(name, reason):
    path = os.path.join(root, 'bad', name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    bad[path] = reason
    return path

  with open(add('corrupt.wav', 'undecodable'), 'wb') as f:
    f.write(b'not audio at all ' * 100)
  open(add('empty.flac', 'empty file'), 'wb').close()
  fx.write(add('zero.wav', 'zero-length'), np.zeros((0, 1), np.float32), SR)
  fx.write(add('short.wav', 'shorter than a segment'), fx.tone(0.1, SR, 300.0),
           SR)
  x = fx.tone(1.0, SR, 300.0)
  x[5] = np.nan
  fx.write(add('nan.wav', 'NaN or Inf'), x, SR, subtype='FLOAT')
  x = fx.tone(1.0, SR, 300.0)
  x[50] = -np.inf
  fx.write(add('inf.wav', 'NaN or Inf'), x, SR, subtype='FLOAT')
  fx.write(add('huge.wav', 'too long'), fx.tone(4.0, SR, 300.0), SR)
  return bad


def test_batches_have_config_shapes(tmp_path):
  fx.good_folder(str(tmp_path), 3, sample_rate=22050)
  c = fx.data_config(str(tmp_path), channels=2, segment_seconds=0.3,
                     batch_size=4)
  (batch,) = _take(pipeline.audio_dataset(c, 'train'), 1)
  assert set(batch) == {'audio'}
  assert batch['audio'].dtype == np.float32
  assert batch['audio'].shape == (4, 2400, 2)


def test_bad_files_reported_once_counted_and_good_files_all_read(tmp_path, caplog):
  root = str(tmp_path)
  good = fx.good_folder(root, 4)
  # Unexpected rate and channel count are converted, not rejected.
  odd = fx.write(os.path.join(root, 'odd', 'stereo44k.flac'),
                 fx.tone(1.0, 44100, 500.0, channels=2), 44100)
  bad = _bad_folder(root)
  c = fx.data_config(root, max_file_seconds=2.0, batch_size=1)
  with caplog.at_level(logging.WARNING, logger='musicjax.data'):
    ds = pipeline.audio_dataset(c, 'train')
    batches = _take(ds, 3 * (len(good) + 1))
  freqs = {(_peak_hz(b['audio'][0])) for b in batches}
  expected = {200 + 50 * i for i in range(len(good))} | {500}
  assert freqs == expected, (freqs, odd)
  messages = [r.getMessage() for r in caplog.records]
  for path, reason in bad.items():
    named = [m for m in messages if path in m]
    assert len(named) == 1, (path, messages)
    assert named[0].startswith(f'musicjax: skipping bad audio file {path}: ')
    assert reason in named[0]
  assert set(fx.bad_under(root)) == set(bad)


def test_no_usable_audio_names_the_path(tmp_path):
  _bad_folder(str(tmp_path))
  c = fx.data_config(str(tmp_path), max_file_seconds=2.0)
  with pytest.raises(sources.NoUsableAudio, match='no usable audio') as e:
    pipeline.audio_dataset(c, 'train')
  assert isinstance(e.value, ValueError)
  assert str(tmp_path) in str(e.value) and 'config.data.path' in str(e.value)
  with pytest.raises(sources.NoUsableAudio, match='not a directory'):
    pipeline.audio_dataset(fx.data_config(str(tmp_path / 'missing')), 'train')


def test_exact_resume(tmp_path):
  fx.good_folder(str(tmp_path), 5)
  c = fx.data_config(str(tmp_path), batch_size=2)
  it = iter(pipeline.audio_dataset(c, 'train'))
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it)['audio'] for _ in range(4)]
  fresh = iter(pipeline.audio_dataset(c, 'train'))
  fresh.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh)['audio'], want)


def test_bad_item_found_while_reading_is_skipped_and_resume_stays_exact(
    tmp_path, monkeypatch, caplog):
  fx.good_folder(str(tmp_path), 3)
  x = fx.tone(1.0, SR, 900.0)
  x[::500] = np.nan  # a file that changed after the scan; every crop hits NaN
  nan_path = fx.write(str(tmp_path / 'late_nan.wav'), x, SR, subtype='FLOAT')
  monkeypatch.setattr(sources, 'scan', lambda paths, config: list(paths))
  c = fx.data_config(str(tmp_path), batch_size=1)
  with caplog.at_level(logging.WARNING, logger='musicjax.data'):
    it = iter(pipeline.audio_dataset(c, 'train'))
    first = [next(it)['audio'] for _ in range(5)]
    state = it.get_state()
    rest = [next(it)['audio'] for _ in range(6)]
  assert all((_peak_hz(b[0])) != 900 for b in first + rest)
  assert fx.bad_under(tmp_path) == {nan_path: 'contains NaN or Inf samples'}
  assert sum(nan_path in r.getMessage() for r in caplog.records) == 1
  fresh = iter(pipeline.audio_dataset(c, 'train'))
  fresh.set_state(state)
  for want in rest:
    np.testing.assert_array_equal(next(fresh)['audio'], want)


def test_train_crops_are_seeded(tmp_path):
  fx.good_folder(str(tmp_path), 3, seconds=3.0)
  c = fx.data_config(str(tmp_path))
  a = _take(pipeline.audio_dataset(c, 'train'), 3)
  b = _take(pipeline.audio_dataset(c, 'train'), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['audio'], y['audio'])
  c.data.shuffle_seed = 1
  other = _take(pipeline.audio_dataset(c, 'train'), 3)
  assert any(not np.array_equal(x['audio'], y['audio'])
             for x, y in zip(a, other))


def test_eval_uses_centre_crop(tmp_path):
  sr = SR
  ramp = (np.arange(2 * sr, dtype=np.float32) / (2 * sr))[:, None]
  fx.write(str(tmp_path / 'ramp.wav'), ramp, sr, subtype='FLOAT')
  c = fx.data_config(str(tmp_path), eval_fraction=1.0, eval_batch_size=1,
                     segment_seconds=0.5)
  for batch in _take(pipeline.audio_dataset(c, 'eval'), 2):
    np.testing.assert_allclose(batch['audio'][0], ramp[6000:10000], atol=1e-6)


def test_process_shards_are_disjoint_and_cover(tmp_path):
  fx.good_folder(str(tmp_path), 6)
  c = fx.data_config(str(tmp_path), batch_size=2)
  whole = np.concatenate([b['audio'] for b in
                          _take(pipeline.audio_dataset(c, 'train', 0, 1), 6)])
  shares = [np.concatenate([b['audio'] for b in
                            _take(pipeline.audio_dataset(c, 'train', i, 2), 6)])
            for i in range(2)]
  # Global element k is process k % 2's element k // 2.
  np.testing.assert_array_equal(shares[0], whole[0::2])
  np.testing.assert_array_equal(shares[1], whole[1::2])
  first_epoch = [(_peak_hz(x)) for s in shares for x in s[:3]]
  assert sorted(first_epoch) == [200 + 50 * i for i in range(6)]


def test_batch_not_divisible_names_key(tmp_path):
  fx.good_folder(str(tmp_path), 2)
  c = fx.data_config(str(tmp_path), batch_size=3)
  with pytest.raises(ConfigError, match='config.data.batch_size'):
    pipeline.audio_dataset(c, 'train', 0, 2)


def test_unknown_kind_names_key(tmp_path):
  c = fx.data_config(str(tmp_path), kind='s3')
  with pytest.raises(ValueError, match="config.data.kind='s3'"):
    pipeline.audio_dataset(c, 'train')


def test_folder_split_is_stable_and_tiny_folders_get_an_eval_file(tmp_path):
  files = fx.good_folder(str(tmp_path), 2)
  split = sources.folder_split(files, str(tmp_path), 0.1)
  assert len(split['eval']) == 1 and len(split['train']) == 1
  one = sources.folder_split(files[:1], str(tmp_path), 0.1)
  assert one == {'train': files[:1], 'eval': []}
  all_eval = sources.folder_split(files, str(tmp_path), 1.0)
  assert len(all_eval['eval']) == 1 and len(all_eval['train']) == 1
  many = [os.path.join(str(tmp_path), f'f{i}.wav') for i in range(400)]
  split = sources.folder_split(many, str(tmp_path), 0.1)
  assert 20 < len(split['eval']) < 60
  assert not set(split['eval']) & set(split['train'])
  # Membership depends on the path only, not on the other files.
  assert set(sources.folder_split(many[::2], str(tmp_path), 0.1)['eval']) == (
      set(split['eval']) & set(many[::2]))


def test_sidecar_metadata(tmp_path):
  a, b, c = fx.good_folder(str(tmp_path), 3)
  with open(a + '.json', 'w') as f:
    f.write('{"tags": ["bach"]}')
  with open(os.path.splitext(b)[0] + '.json', 'w') as f:
    f.write('{"title": "x"}')
  with open(os.path.splitext(c)[0] + '.json', 'w') as f:
    f.write('[1, 2')
  assert sources.sidecar_metadata(a) == {'tags': ['bach']}
  assert sources.sidecar_metadata(b) == {'title': 'x'}
  assert sources.sidecar_metadata(c) == {}


def test_worker_processes_give_the_same_batches_and_resume(tmp_path):
  fx.good_folder(str(tmp_path), 3)
  c = fx.data_config(str(tmp_path))
  want = _take(pipeline.audio_dataset(c, 'train'), 3)
  c.data.num_workers = 1
  it = iter(pipeline.audio_dataset(c, 'train'))
  got = [next(it)]
  state = it.get_state()
  got += [next(it), next(it)]
  for x, y in zip(want, got):
    np.testing.assert_array_equal(x['audio'], y['audio'])
  resumed = iter(pipeline.audio_dataset(c, 'train'))
  resumed.set_state(state)
  for y in got[1:]:
    np.testing.assert_array_equal(next(resumed)['audio'], y['audio'])


def test_bad_files_found_in_worker_processes_are_counted_here(tmp_path, monkeypatch):
  # Damage found only while reading, inside a Grain worker process, must still
  # reach this process's count (the trainer logs it as data/bad_files).
  fx.good_folder(str(tmp_path), 2)
  x = fx.tone(1.0, SR, 900.0)
  x[::500] = np.nan
  nan_path = fx.write(str(tmp_path / 'late_nan.wav'), x, SR, subtype='FLOAT')
  monkeypatch.setattr(sources, 'scan', lambda paths, config: list(paths))
  c = fx.data_config(str(tmp_path), batch_size=1)
  c.data.num_workers = 1
  it = iter(pipeline.audio_dataset(c, 'train'))
  for _ in range(6):
    assert _peak_hz(next(it)['audio'][0]) != 900
  assert audio.bad_files()[nan_path] == 'contains NaN or Inf samples'
  assert nan_path not in audio._bad  # found by the worker, not in this process
