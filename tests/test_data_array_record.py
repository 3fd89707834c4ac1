"""ArrayRecord shards: write, read back, prepare from a folder, pipeline."""
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from musicjax.data import audio
from musicjax.data import audio_records
from musicjax.data import pipeline
from musicjax.data import sources
from musicjax.prepare import audio as prepare_audio
from tests import audio_fixtures as fx

SR = 8000


def test_write_and_read_back_equal_audio(tmp_path):
  xs = [fx.tone(0.3 + 0.1 * i, SR, 200.0 + 50 * i) for i in range(5)]
  records = [{'audio': x, 'sample_rate': SR, 'meta': {'i': i, 'title': 'Grüß'}}
             for i, x in enumerate(xs)]
  paths = audio_records.write_array_record(records, str(tmp_path), 2, 'eval')
  assert [os.path.basename(p) for p in paths] == [
      'eval-00000-of-00003.array_record', 'eval-00001-of-00003.array_record',
      'eval-00002-of-00003.array_record']
  items = audio_records.read_array_record(str(tmp_path), 'eval')
  assert [it['meta'] for it in items] == [r['meta'] for r in records]
  for it, x in zip(items, xs):
    y = audio.load_audio(it['source'], SR, 1, name=it['name'])
    np.testing.assert_allclose(y, x, atol=1.0 / 2**15)
  # Rewriting replaces the old set instead of mixing two shard counts.
  audio_records.write_array_record(records[:1], str(tmp_path), 2, 'eval')
  assert sorted(os.listdir(tmp_path)) == ['eval-00000-of-00001.array_record']


def test_damaged_record_is_reported_not_raised():
  item = audio_records.decode_record(b'garbage', '/d/train#3')
  assert 'damaged record' in item['error']


def test_prepare_folder_then_train_from_shards(tmp_path, caplog):
  src = str(tmp_path / 'src')
  good = fx.good_folder(src, 5, sample_rate=22050)
  open(os.path.join(src, 'broken.wav'), 'wb').write(b'\x00' * 64)
  c = fx.data_config(src, eval_fraction=0.3, records_per_shard=2)
  out = str(tmp_path / 'shards')
  with caplog.at_level(logging.WARNING, logger='musicjax.data'):
    counts = prepare_audio.prepare_audio_main(c, out)
  assert counts['train'] + counts['eval'] == len(good)
  assert counts['eval'] >= 1
  assert list(fx.bad_under(src)) == [os.path.join(src, 'broken.wav')]
  assert sum('broken.wav' in r.getMessage() for r in caplog.records) == 1
  items = audio_records.read_array_record(out, 'train')
  origins = sorted(it['meta']['origin'] for it in items)
  split = sources.folder_split(sources.list_audio_files(src), src, 0.3)
  assert origins == sorted(p for p in split['train'] if p in good)
  c.data.kind = 'array_record'
  c.data.path = out
  batch = next(iter(pipeline.audio_dataset(c, 'train')))
  assert batch['audio'].shape == (2, 2000, 1)
  eval_batch = next(iter(pipeline.audio_dataset(c, 'eval')))
  assert eval_batch['audio'].shape == (2, 2000, 1)


def test_short_records_are_skipped_while_reading(tmp_path, caplog):
  records = [
      {'audio': fx.tone(1.0, SR, 200.0), 'sample_rate': SR, 'meta': {}},
      {'audio': fx.tone(0.1, SR, 250.0), 'sample_rate': SR,
       'meta': {'origin': 'short.wav'}},
      {'audio': fx.tone(1.0, SR, 400.0), 'sample_rate': SR, 'meta': {}},
  ]
  audio_records.write_array_record(records, str(tmp_path), 2, 'train')
  c = fx.data_config(str(tmp_path), kind='array_record', batch_size=1)
  with caplog.at_level(logging.WARNING, logger='musicjax.data'):
    it = iter(pipeline.audio_dataset(c, 'train'))
    batches = [next(it)['audio'] for _ in range(6)]
  assert all(b.shape == (1, 2000, 1) for b in batches)
  ours = fx.bad_under(tmp_path)
  assert list(ours.values()) == ['shorter than a segment: 0.100 s < 0.25 s']
  assert 'short.wav' in next(iter(ours))


def test_missing_shards_error_names_path(tmp_path):
  c = fx.data_config(str(tmp_path), kind='array_record')
  with pytest.raises(sources.NoUsableAudio, match='config.data.path'):
    pipeline.audio_dataset(c, 'train')


def test_all_records_unreadable_stops_with_named_error(tmp_path):
  # Every record is too short: nothing fails in the upfront scan, everything
  # fails when read. The pipeline must stop with an error, not loop forever.
  records = [{'audio': fx.tone(0.1, SR, 200.0 + i), 'sample_rate': SR, 'meta': {}}
             for i in range(3)]
  audio_records.write_array_record(records, str(tmp_path), 2, 'train')
  c = fx.data_config(str(tmp_path), kind='array_record', batch_size=1)
  with pytest.raises(sources.NoUsableAudio, match='config.data.path'):
    next(iter(pipeline.audio_dataset(c, 'train')))
  # Each named once, not once per repeat.
  assert len(fx.bad_under(tmp_path)) == 3, audio.bad_files()


# A real kill (SIGKILL: no finally, no cleanup) when file number `after` loads.
_KILLED_PREPARE = '''
import os, signal, sys
from musicjax.data import audio
from musicjax.prepare import audio as prepare_audio
from tests import audio_fixtures as fx
src, out, after = sys.argv[1:4]
real, loaded = audio.load_audio, []

def load_then_die(*args, **kwargs):
  if len(loaded) == int(after):
    os.kill(os.getpid(), signal.SIGKILL)
  loaded.append(args[0])
  return real(*args, **kwargs)

audio.load_audio = load_then_die
prepare_audio.prepare_audio_main(
    fx.data_config(src, eval_fraction=0.3, records_per_shard=2), out)
'''


def _shard_bytes(out):
  return {name: open(os.path.join(out, name), 'rb').read()
          for name in sorted(os.listdir(out)) if name.endswith('.array_record')}


def test_a_killed_prepare_resumes_at_its_file_and_equals_a_clean_run(
    tmp_path, monkeypatch):
  src = str(tmp_path / 'src')
  fx.good_folder(src, 7, sample_rate=22050)
  c = fx.data_config(src, eval_fraction=0.3, records_per_shard=2)
  clean = str(tmp_path / 'clean')
  prepare_audio.prepare_audio_main(c, clean)

  train = [it['name'] for it in sources.folder_items(c, 'train')]
  evals = [it['name'] for it in sources.folder_items(c, 'eval')]
  assert len(evals) >= 2
  out = str(tmp_path / 'killed')
  killed = subprocess.run(
      [sys.executable, '-c', _KILLED_PREPARE, src, out, str(len(train) + 1)],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, timeout=300)
  # Train was written; eval was killed on its second file.
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert all(n.startswith('train-') for n in _shard_bytes(out))
  assert sorted(os.listdir(os.path.join(out, '.eval.parts'))) == [
      '00000.rec', 'settings.json']

  loaded = []
  real = audio.load_audio

  def counting(source, *args, **kwargs):
    loaded.append(source)
    return real(source, *args, **kwargs)

  monkeypatch.setattr(audio, 'load_audio', counting)
  counts = prepare_audio.prepare_audio_main(c, out)
  assert loaded == evals[1:]  # only the files the kill left undone
  assert counts == {'train': len(train), 'eval': len(evals)}
  assert _shard_bytes(out) == _shard_bytes(clean)
  assert not [n for n in os.listdir(out) if n.endswith('.parts')]
