"""The built-in chorale dataset: rendering, metadata, split, cache, pipeline."""
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from musicjax.config import base_config
from musicjax.data import chorales
from musicjax.data import pipeline

SR = 16000


def _config(cache_dir: str, max_pieces: int = 3):
  c = base_config()
  c.data.kind = 'chorales'
  c.data.cache_dir = cache_dir
  c.data.max_pieces = max_pieces
  c.data.sample_rate = SR
  c.data.segment_seconds = 0.5
  c.data.batch_size = 2
  c.data.eval_batch_size = 1
  return c


@pytest.fixture(scope='module')
def rendered(tmp_path_factory):
  c = _config(str(tmp_path_factory.mktemp('cache')))
  return c, {s: chorales.chorale_manifest(c, s) for s in ('train', 'eval')}


def test_cache_files_are_readable_like_any_new_file(rendered, tmp_path):
  """A shared render cache: every stem and metadata file has the mode open()
  gives under the umask, not the 0600 of a bare temporary file."""
  c, _ = rendered
  plain = tmp_path / 'plain'
  plain.write_text('')
  want = stat.S_IMODE(os.stat(plain).st_mode)
  found = 0
  for root, _, names in os.walk(c.data.cache_dir):
    for n in names:
      if n.endswith(('.flac', '.json')):
        found += 1
        assert stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode) == want, n
  assert found >= 3 * 4      # three pieces: three stems and a meta.json each


def test_split_is_by_bwv_and_disjoint(rendered):
  c, m = rendered
  assert len(m['train']) == 2 and len(m['eval']) == 1
  n = c.data.eval_every_nth_bwv
  assert all(chorales.bwv_integer(e['bwv']) % n for e in m['train'])
  assert all(chorales.bwv_integer(e['bwv']) % n == 0 for e in m['eval'])
  assert not {e['bwv'] for e in m['train']} & {e['bwv'] for e in m['eval']}


def test_metadata_fields(rendered):
  _, m = rendered
  for e in m['train'] + m['eval']:
    meta = e['meta']
    assert meta['bwv'] == e['bwv'] == e['id'].removeprefix('bwv')
    assert meta['title'] and isinstance(meta['title'], str)
    tonic, mode = meta['key'].split(' ')
    assert mode in ('major', 'minor') and tonic[0] in 'ABCDEFG'
    num, den = meta['time_signature'].split('/')
    assert int(num) > 0 and int(den) in (2, 4, 8)
    assert meta['tempo_bpm'] == 80.0 and meta['sample_rate'] == SR
    assert meta['instruments']['vocal'][0]['part'] == 'Soprano'
    assert [i['part'] for i in meta['instruments']['accompaniment']] == [
        'Alto', 'Tenor', 'Bass']
    phrases = meta['phrases']
    assert len(phrases) >= 2  # chorales have several fermata phrases
    starts = [p['start'] for p in phrases]
    assert starts[0] == 0.0 and starts == sorted(starts)
    for a, b in zip(phrases, phrases[1:]):
      assert a['start'] < a['end'] <= b['start']
    assert phrases[-1]['end'] <= meta['duration_seconds']
    assert ' '.join(p['text'] for p in phrases if p['text']) == meta['lyrics']
    assert meta['lyrics']  # German text from the soprano
  first = m['train'][0]['meta']
  assert first['bwv'] == '269'
  assert first['title'] == 'Aus meines Herzens Grunde'
  assert first['key'] == 'G major' and first['time_signature'] == '3/4'
  assert first['phrases'][0]['text'] == 'Aus meines Herzens Grunde'
  # The first fermata note (offset 10, a half note) ends 12 quarters in.
  assert first['phrases'][0]['end'] == pytest.approx(12 * 60 / 80)


def test_stems_are_consistent_and_pitched(rendered):
  _, m = rendered
  for e in m['train'] + m['eval']:
    stems = {s: sf.read(p, dtype='float32') for s, p in e['stems'].items()}
    assert all(sr == SR for _, sr in stems.values())
    v, a, mix = (stems[s][0] for s in ('vocal', 'accompaniment', 'mix'))
    assert len(v) == len(a) == len(mix) == round(
        e['meta']['duration_seconds'] * SR)
    np.testing.assert_allclose(v + a, mix, atol=3 / 2**15)
    assert np.sqrt(np.mean(v**2)) > 1e-3 and np.sqrt(np.mean(a**2)) > 1e-3
    # The soprano's first note is the strongest pitch early in the vocal stem.
    seg = v[int(0.05 * SR):int(0.35 * SR)]
    spectrum = np.abs(np.fft.rfft(seg * np.hanning(len(seg)), 8 * len(seg)))
    hz = np.argmax(spectrum) * SR / (8 * len(seg))
    assert 69 + 12 * np.log2(hz / 440) == pytest.approx(
        e['meta']['first_soprano_midi'], abs=0.5)


def test_cache_is_reused(rendered, monkeypatch):
  c, m = rendered

  def fail(*a, **k):
    raise AssertionError('rendered or parsed again')

  monkeypatch.setattr(chorales, 'parse_piece', fail)
  monkeypatch.setattr(chorales, '_render_piece', fail)
  again = chorales.chorale_manifest(c, 'train')
  assert [e['path'] for e in again] == [e['path'] for e in m['train']]
  assert again[0]['meta'] == m['train'][0]['meta']


def test_pipeline_reads_the_mix(rendered):
  c, m = rendered
  it = iter(pipeline.audio_dataset(c, 'train'))
  batch = next(it)
  assert batch['audio'].shape == (2, 8000, 1)
  assert np.all(np.isfinite(batch['audio']))
  (ev,) = [next(iter(pipeline.audio_dataset(c, 'eval')))['audio']]
  mix, _ = sf.read(m['eval'][0]['path'], dtype='float32')
  start = (len(mix) - 8000) // 2
  np.testing.assert_allclose(ev[0, :, 0], mix[start:start + 8000], atol=1e-6)


# Renders the first two chorales into a cache and prints, per piece, whether
# this process rendered it. Separate interpreters, like hosts sharing a disk.
_RENDER_SCRIPT = """
import json, sys
from musicjax.data import chorales
root = sys.argv[1]
print(json.dumps([chorales.ensure_piece(root, pid, name, %d, 80.0)[1]
                  for pid, name in chorales.candidates()[:2]]))
""" % SR


def test_concurrent_processes_render_each_piece_once(tmp_path):
  root = str(tmp_path / 'shared')
  os.makedirs(root)
  procs = [subprocess.Popen([sys.executable, '-c', _RENDER_SCRIPT, root],
                            stdout=subprocess.PIPE, text=True)
           for _ in range(2)]
  flags = []
  for p in procs:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0
    flags.append(json.loads(out.strip().splitlines()[-1]))
  assert [sum(col) for col in zip(*flags)] == [1, 1]
  for pid, _ in chorales.candidates()[:2]:
    names = sorted(os.listdir(os.path.join(root, pid)))
    assert names == ['.lock', 'accompaniment.flac', 'meta.json', 'mix.flac',
                     'vocal.flac']


def test_split_limits_and_bwv_numbers():
  c = base_config()
  c.data.max_pieces = 1
  assert chorales.split_limits(c) == {'train': 1, 'eval': 1}
  c.data.max_pieces = 20
  assert chorales.split_limits(c) == {'train': 18, 'eval': 2}
  c.data.max_pieces = 0
  assert chorales.split_limits(c) == {'train': None, 'eval': None}
  assert [chorales.bwv_integer(b) for b in ('269', '1.2', '248.12-2')] == [
      269, 1, 248]
  assert chorales.split_of('40.8', 10) == 'eval'
  assert chorales.split_of('269', 10) == 'train'


def test_missing_tinysoundfont_names_the_install_command(tmp_path, monkeypatch):
  """`pip install musicjax` cannot bring tinysoundfont (its declared pyaudio has
  no Linux wheel): rendering says how to install it instead of a bare
  ModuleNotFoundError."""
  from musicjax.errors import UserError
  monkeypatch.setitem(sys.modules, 'tinysoundfont', None)  # import fails
  with pytest.raises(UserError) as e:
    chorales.render_events([(0.0, 0.5, 60, 0, 100)], SR, 1.0)
  msg = str(e.value)
  assert "pip install --no-deps 'tinysoundfont>=0.3.6'" in msg, msg
  assert 'chorale' in msg, msg
  # The same error reaches the caller of the dataset (nothing is half-written).
  c = _config(str(tmp_path / 'cache'), max_pieces=1)
  with pytest.raises(UserError, match='tinysoundfont'):
    chorales.chorale_manifest(c, 'train')
  assert not any(f.endswith('.flac') for _, _, fs in os.walk(tmp_path) for f in fs)
