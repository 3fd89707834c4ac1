"""`musicjax prepare --codec-workdir`: token shards from a (tiny) trained codec."""
import copy
import glob
import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from musicjax.codec import chunked
from musicjax.data import audio
from musicjax.data import augment
from musicjax.data import melody as melody_lib
from musicjax.data import sources
from musicjax.data import text
from musicjax.data import token_records
from musicjax.errors import UserError
from musicjax.prepare import token_augment
from musicjax.prepare import token_encode
from musicjax.prepare import token_items
from musicjax.prepare import tokens as prepare_tokens
from musicjax.train import runs
from musicjax.train import trainer
from tests import audio_fixtures as fx
from tests import codec_fixtures as cf

SR = 8000  # codec_fixtures.small_config
SECONDS = 0.6  # every good file this long: one encoder compile for all of them
LYRICS = 'Grüß Gott, schöne Welt — 日本語の歌 ♪'
# Paths chosen so that each split holds good files (checked in the tests):
# folder_split puts a, b, e, broken in train and c, d, badmeta in eval.
PLAIN_FILES = ('a', 'b', 'c', 'd', 'e')
STEM_SONGS_GOOD = ('song_a', 'song_b')  # train, eval


@pytest.fixture(scope='module')
def codec(tmp_path_factory):
  """(workdir, codec config, model): a tiny codec trained for 2 steps."""
  tmp = tmp_path_factory.mktemp('codec')
  data = str(tmp / 'data')
  fx.good_folder(data, 4, seconds=1.0, sample_rate=SR)
  c = cf.folder_run_config(data)
  # Codebooks seeded from loud segments only: after 2 steps the EQ'd copies of
  # the test tones still land on other codes than the plain stems.
  c.data.gain_augment_dbfs = ()
  wd = str(tmp / 'run')
  trainer.train(c, wd)
  run = runs.load_run(wd)
  return wd, run.config, run.model


def _data_config(codec_config, path, **data):
  c = copy.deepcopy(codec_config)
  c.data.kind, c.data.path = 'folder', path
  c.data.eval_fraction, c.data.records_per_shard = 0.3, 2
  for k, v in data.items():
    c.data[k] = v
  return c


def _plain_folder(root):
  """Good files a..e (a with non-ASCII lyrics), a corrupt wav, bad metadata."""
  paths = {}
  for i, name in enumerate(PLAIN_FILES):
    paths[name] = fx.write(os.path.join(root, f'{name}.wav'),
                           fx.tone(SECONDS, SR, 220.0 * 2 ** (i / 12)), SR)
  with open(os.path.join(root, 'a.json'), 'w', encoding='utf-8') as f:
    json.dump({'title': 'Grüße', 'lyrics': LYRICS, 'tags': 'genre: pop; mood: happy'},
              f, ensure_ascii=False)
  broken = os.path.join(root, 'broken.wav')
  with open(broken, 'wb') as f:
    f.write(b'RIFF\x00\x00\x00\x00WAVEjunk' + b'\x13' * 100)
  badmeta = fx.write(os.path.join(root, 'badmeta.wav'),
                     fx.tone(SECONDS, SR, 300.0), SR)
  with open(os.path.join(root, 'badmeta.json'), 'w') as f:
    json.dump({'sections': 'not a list'}, f)
  split = sources.folder_split(sources.list_audio_files(root), root, 0.3)
  assert {os.path.basename(p) for p in split['train']} == {
      'a.wav', 'b.wav', 'e.wav', 'broken.wav'}, split
  return paths, broken, badmeta


def _records(out):
  """{origin: record} over both splits."""
  found = {}
  for split in sources.SPLITS:
    ds = token_records.source(out, split)
    for i in range(len(ds)):
      r = ds[i]
      assert 'error' not in r, r
      found[r['meta']['origin']] = dict(r, split=split)
  return found


def test_prepare_folder_codes_melody_meta_and_bad_files(tmp_path, codec):
  wd, codec_config, model = codec
  paths, broken, badmeta = _plain_folder(str(tmp_path / 'src'))
  out = str(tmp_path / 'tokens')
  c = _data_config(codec_config, str(tmp_path / 'src'))
  result = prepare_tokens.prepare_tokens_main(wd, out, c)

  assert result['train'] == 3 and result['eval'] == 2, result
  assert result['bad_files'] == 2
  # train [a, b], [e]; eval [c, d], [badmeta]: a shard may end up empty.
  shards = glob.glob(os.path.join(out, '*.array_record'))
  assert sorted(os.path.basename(p) for p in shards) == [
      'eval-p000-00000.array_record', 'eval-p000-00001.array_record',
      'train-p000-00000.array_record', 'train-p000-00001.array_record']
  bad = audio.bad_files()
  assert broken in bad and 'corrupt' in bad[broken]
  assert 'unusable metadata' in bad[badmeta]

  records = _records(out)
  assert sorted(records) == sorted(paths.values())  # every good file, once
  hop = model.hop_length
  for origin, r in records.items():
    x = audio.load_audio(origin, SR, 1)
    want = chunked.encode_array(model, x)
    assert r['codes'].dtype == np.int16
    np.testing.assert_array_equal(r['codes'], want)
    frames = int(np.ceil(x.shape[0] / hop))
    assert r['codes'].shape == (frames, 3)
    assert r['melody'].dtype == np.int8 and r['melody'].shape == (frames,)
    np.testing.assert_array_equal(r['melody'], melody_lib.chroma_tokens(x, SR, hop))
    m = r['meta']
    assert (m['num_frames'], m['frame_rate'], m['sample_rate']) == (frames, SR / hop, SR)
    assert m['id'] == os.path.splitext(os.path.basename(origin))[0]
    assert 'vocal_codes' not in r
  a = records[paths['a']]['meta']
  assert (a['lyrics'], a['title'], a['tags']) == (
      LYRICS, 'Grüße', 'genre: pop; mood: happy')
  # The mix is a 220 Hz tone (A): its melody says A wherever it is not silent.
  assert np.mean(records[paths['a']]['melody'] == 9) > 0.9

  info = token_records.read_dataset_info(out)
  assert info['format'] == 'musicjax-tokens-v1'
  assert (info['num_codebooks'], info['codebook_size']) == (3, 32)
  assert info['hop_length'] == hop
  assert (info['sample_rate'], info['channels'], info['frame_rate']) == (SR, 1, SR / hop)
  assert info['splits'] == {'train': 3, 'eval': 2} and info['stems'] is False
  assert set(info['bad_files']) == {broken, badmeta}
  assert info['codec_workdir'] == os.path.abspath(wd)
  # The text tokenizer learned the train lyrics: they round-trip.
  tok = text.TextTokenizer.load(out)
  assert tok.decode(tok.encode(LYRICS)) == LYRICS
  # Shards, sidecars, dataset.json and the tokenizer: the mode a plain open
  # gives, so a team can share the directory (mkstemp alone gives 0600).
  plain = tmp_path / 'plain'
  plain.write_text('')
  want = stat.S_IMODE(os.stat(plain).st_mode)
  names = os.listdir(out)
  assert {'dataset.json', 'tokenizer.json'} <= set(names) and len(names) == 10
  for n in names:
    assert stat.S_IMODE(os.stat(os.path.join(out, n)).st_mode) == want, n


def _stem_folder(root):
  """song_a: vocals + accompaniment (no mix); song_b: + mix; uneven: stems of
  different lengths; lonely: no accompaniment."""
  vocal = fx.tone(SECONDS, SR, 440.0, amplitude=0.2)          # A
  accomp = fx.tone(SECONDS, SR, 261.63, amplitude=0.6)        # C, louder
  w = lambda song, stem, x: fx.write(os.path.join(root, song, f'{stem}.wav'), x, SR)
  files = {
      'song_a': {'vocal': w('song_a', 'vocals', vocal),
                 'accompaniment': w('song_a', 'accompaniment', accomp)},
      'song_b': {'vocal': w('song_b', 'vocals', vocal),
                 'accompaniment': w('song_b', 'accompaniment', accomp),
                 'mix': w('song_b', 'mix', 0.5 * (vocal + accomp))},
  }
  w('uneven', 'vocals', vocal)
  w('uneven', 'accompaniment', accomp[:len(accomp) // 2])
  w('lonely', 'vocals', vocal)
  with open(os.path.join(root, 'song_a', 'meta.json'), 'w', encoding='utf-8') as f:
    json.dump({'lyrics': LYRICS}, f, ensure_ascii=False)
  return files, vocal, accomp


def test_stem_folders_give_stem_codes_and_bad_songs_are_skipped(tmp_path, codec):
  wd, codec_config, model = codec
  root = str(tmp_path / 'songs')
  files, vocal, accomp = _stem_folder(root)
  out = str(tmp_path / 'tokens')
  c = _data_config(codec_config, root)
  result = prepare_tokens.prepare_tokens_main(wd, out, c, stems=True)
  assert (result['train'], result['eval'], result['bad_files']) == (1, 1, 2)

  bad = audio.bad_files()
  assert 'stem lengths differ' in bad[os.path.join(root, 'uneven')]
  assert 'missing stem accompaniment.<' in bad[os.path.join(root, 'lonely')]
  records = _records(out)
  assert sorted(records) == [os.path.join(root, s) for s in STEM_SONGS_GOOD]
  assert [records[os.path.join(root, s)]['split'] for s in STEM_SONGS_GOOD] == [
      'train', 'eval']
  enc = lambda x: chunked.encode_array(model, x)
  for song, stems in files.items():
    r = records[os.path.join(root, song)]
    np.testing.assert_array_equal(r['vocal_codes'], enc(vocal))
    np.testing.assert_array_equal(r['accompaniment_codes'], enc(accomp))
    mix = audio.load_audio(stems['mix'], SR, 1) if 'mix' in stems else vocal + accomp
    np.testing.assert_array_equal(r['codes'], enc(mix))
    # The melody follows the vocal (A = 9), not the louder accompaniment (C).
    assert np.mean(r['melody'] == 9) > 0.9, r['melody']
    assert r['meta']['stem_origins'] == stems
  assert records[os.path.join(root, 'song_a')]['meta']['lyrics'] == LYRICS
  assert records[os.path.join(root, 'song_a')]['meta']['id'] == 'song_a'
  assert token_records.read_dataset_info(out)['stems'] is True


STRETCH, STEPS = 1.25, 2   # the only choices, so the variants are known


def _augment_config(codec_config, root, **augment_keys):
  c = _data_config(codec_config, root)
  for k, v in augment_keys.items():
    c.data.augment[k] = v
  return c


def test_stem_stats_eq_copies_and_speed_pitch_variants(tmp_path, codec):
  wd, codec_config, model = codec
  root = str(tmp_path / 'songs')
  files, vocal, accomp = _stem_folder(root)
  # 'quiet' (a train song): a silent vocal, timed phrases and a key.
  fx.write(os.path.join(root, 'quiet', 'vocals.wav'), np.zeros_like(vocal), SR)
  fx.write(os.path.join(root, 'quiet', 'accompaniment.wav'), accomp, SR)
  with open(os.path.join(root, 'quiet', 'meta.json'), 'w') as f:
    json.dump({'key': 'D major',
               'phrases': [{'start': 0.1, 'end': 0.5, 'text': 'la'}]}, f)
  c = _augment_config(codec_config, root, eq_copies=2, speed_pitch_fraction=1.0,
                      stretch_rates=(STRETCH,), pitch_steps=(STEPS,))
  out = str(tmp_path / 'tokens')
  result = prepare_tokens.prepare_tokens_main(wd, out, c, stems=True)
  # Train: song_a and quiet, each with a tempo and a pitch copy; eval: song_b.
  assert (result['train'], result['eval']) == (6, 1), result

  by_id = {}
  for split in sources.SPLITS:
    ds = token_records.source(out, split)
    for i in range(len(ds)):
      by_id[ds[i]['meta']['id']] = dict(ds[i], split=split)
  variants = lambda s: [s, f'{s}@x{STRETCH:g}', f'{s}@+{STEPS}st']
  assert sorted(by_id) == sorted(variants('song_a') + variants('quiet') + ['song_b'])
  assert by_id['song_b']['split'] == 'eval'
  assert all(by_id[i]['split'] == 'train' for i in variants('song_a') + variants('quiet'))

  hop = model.hop_length
  frames = int(np.ceil(len(vocal) / hop))
  stretched = int(np.ceil(round(len(vocal) / STRETCH) / hop))
  for song_id, r in by_id.items():
    f = stretched if '@x' in song_id else frames
    assert r['codes'].shape == (f, 3), song_id
    eq = r['accompaniment_eq_codes']
    assert eq.shape == (2, f, 3) and eq.dtype == r['accompaniment_codes'].dtype
    # An EQ'd copy (normalised to -16 dBFS) is not the plain stem. (The two
    # copies of a pure sine only differ in phase: the tiny codec may give both
    # the same codes; their filters differ, see the check of copy 1 below.)
    assert not np.array_equal(eq[0], r['accompaniment_codes'])
    stats = r['meta']['stem_stats']
    assert set(stats) == {'vocal_rms_db', 'accompaniment_rms_db', 'vocal_active',
                          'accompaniment_active'}
    # The accompaniment: a 0.6-amplitude sine, -7.4 dBFS, sounding throughout.
    assert abs(stats['accompaniment_rms_db'] - 20 * np.log10(0.6 / np.sqrt(2))) < 1.0
    assert stats['accompaniment_active'] > 0.9
    if song_id.startswith('quiet'):
      assert stats['vocal_rms_db'] <= -100 and stats['vocal_active'] == 0.0
    else:
      assert abs(stats['vocal_rms_db'] - 20 * np.log10(0.2 / np.sqrt(2))) < 1.0
      assert stats['vocal_active'] > 0.9
  # The EQ copies are reproducible from (seed, id, copy): here copy 1 of song_a.
  a = audio.load_audio(files['song_a']['accompaniment'], SR, 1)
  rng = augment.song_rng(c.data.shuffle_seed, 'song_a', 'eq', 1)
  np.testing.assert_array_equal(
      by_id['song_a']['accompaniment_eq_codes'][1],
      chunked.encode_array(model, augment.frequency_balance(a, SR, rng)))
  # The variants' metadata follows them; the origin stays the song's.
  quiet_x = by_id[f'quiet@x{STRETCH:g}']['meta']
  assert quiet_x['augment'] == {'time_stretch': STRETCH}
  assert quiet_x['phrases'][0]['end'] == pytest.approx(0.5 / STRETCH)
  assert quiet_x['origin'] == os.path.join(root, 'quiet')
  quiet_p = by_id[f'quiet@+{STEPS}st']['meta']
  assert quiet_p['key'] == 'E major' and quiet_p['augment'] == {'pitch_shift': STEPS}

  want = {'eq_copies': 2, 'stretch_rates': [STRETCH], 'pitch_steps': [STEPS],
          'speed_pitch_fraction': 1.0, 'seed': c.data.shuffle_seed}
  for path in token_records.shard_paths(out, 'train'):
    with open(path + token_records.SIDECAR_SUFFIX) as f:
      assert json.load(f)['settings']['augment'] == want
  assert token_records.read_dataset_info(out)['augment'] == want
  # Other augment settings on the same --out are refused, not mixed in.
  c.data.augment.eq_copies = 1
  with pytest.raises(UserError, match='augment.*new --out'):
    prepare_tokens.prepare_tokens_main(wd, out, c, stems=True)


def test_augment_settings_are_checked(codec, tmp_path):
  wd, codec_config, _ = codec
  c = _augment_config(codec_config, str(tmp_path), eq_copies=1)
  with pytest.raises(UserError, match=r'eq_copies=1 needs --stems'):
    token_augment.augment_settings(c, stems=False)
  c = _augment_config(codec_config, str(tmp_path), speed_pitch_fraction=1.5)
  with pytest.raises(UserError, match=r'speed_pitch_fraction must be in \[0, 1\]'):
    token_augment.augment_settings(c, stems=True)
  c = _augment_config(codec_config, str(tmp_path), speed_pitch_fraction=0.2,
                      pitch_steps=())
  with pytest.raises(UserError, match='non-empty'):
    token_augment.augment_settings(c, stems=True)
  # Off by default, and then the seed does not pin the run.
  off = token_augment.augment_settings(_data_config(codec_config, ''), stems=True)
  assert off['eq_copies'] == 0 and off['speed_pitch_fraction'] == 0.0
  assert off['seed'] is None


def test_speed_pitch_choice_is_a_deterministic_share_of_songs(codec):
  _, codec_config, _ = codec
  c = _augment_config(codec_config, '/data', speed_pitch_fraction=0.2)
  settings = token_augment.augment_settings(c, stems=True)
  items = [{'name': f'/data/s{i}.wav', 'source': f'/data/s{i}.wav', 'meta': {}}
           for i in range(500)]
  out = token_augment.speed_pitch_variants(items, c, settings)
  assert out == token_augment.speed_pitch_variants(items, c, settings)
  chosen = [it for it in out if it.get('variant')]
  assert 0.15 < len(chosen) / 2 / len(items) < 0.25
  for it in chosen:
    v = it['variant']
    assert v['amount'] in (c.data.augment.stretch_rates if v['kind'] == 'time_stretch'
                           else c.data.augment.pitch_steps)
    assert it['name'] == v['of'] + v['suffix']
    _, song_id = token_items.item_identity(it, c)
    assert song_id == os.path.splitext(os.path.basename(v['of']))[0] + v['suffix']


def _decoded(out):
  return {split: [(r['meta'], r['codes'].tolist(), r['melody'].tolist())
                  for r in (token_records.source(out, split)[i]
                            for i in range(len(token_records.source(out, split))))]
          for split in sources.SPLITS}


def test_resume_reencodes_only_missing_shards_and_equals_clean_run(
    tmp_path, codec, monkeypatch):
  wd, codec_config, _ = codec
  _plain_folder(str(tmp_path / 'src'))
  c = _data_config(codec_config, str(tmp_path / 'src'))
  clean = str(tmp_path / 'clean')
  prepare_tokens.prepare_tokens_main(wd, clean, c)

  out = str(tmp_path / 'resumed')
  prepare_tokens.prepare_tokens_main(wd, out, c)
  shards = [p for split in sources.SPLITS
            for p in token_records.shard_paths(out, split)]
  before = {p: os.stat(p).st_mtime_ns for p in shards}
  gone = os.path.join(out, 'train-p000-00001.array_record')
  os.remove(gone)
  os.remove(os.path.join(out, token_records.DATASET_INFO))
  # The deleted shard's interrupted write left its temporary file behind.
  stale = os.path.join(out, '.train-p000-00001.array_record.tmp')
  with open(stale, 'wb') as f:
    f.write(b'half a shard')
  with pytest.raises(UserError, match='dataset.json not found'):
    token_records.read_dataset_info(out)  # not finished: no description yet
  encoded = []
  real = token_encode.encode_item

  def counting(item, *args, **kwargs):
    encoded.append(item['name'])
    return real(item, *args, **kwargs)

  monkeypatch.setattr(token_encode, 'encode_item', counting)
  result = prepare_tokens.prepare_tokens_main(wd, out, c)

  assert encoded == [os.path.join(str(tmp_path / 'src'), 'e.wav')]  # shard 1 only
  assert all(os.stat(p).st_mtime_ns == t for p, t in before.items() if p != gone)
  assert (result['train'], result['eval']) == (3, 2)
  assert _decoded(out) == _decoded(clean)
  assert token_records.read_dataset_info(out) == token_records.read_dataset_info(clean)
  # The temporary file was overwritten and became the shard.
  assert not os.path.exists(stale) and os.path.isfile(gone)

  # Other settings on the same --out are refused instead of mixed in.
  c.data.records_per_shard = 3
  with pytest.raises(UserError, match='records_per_shard.*new --out'):
    prepare_tokens.prepare_tokens_main(wd, out, c)


# A real kill (SIGKILL: no finally, no cleanup) after `after` songs of a shard.
_KILLED_PREPARE = '''
import os, signal, sys
from musicjax import config as config_lib
from musicjax.prepare import token_encode
from musicjax.prepare import tokens as prepare_tokens
codec_wd, out, config_dir, after = sys.argv[1:5]
real, done = token_encode.encode_item, []

def encode_then_die(item, *args, **kwargs):
  if len(done) == int(after):
    os.kill(os.getpid(), signal.SIGKILL)
  done.append(item['name'])
  return real(item, *args, **kwargs)

token_encode.encode_item = encode_then_die
prepare_tokens.prepare_tokens_main(codec_wd, out, config_lib.load_saved(config_dir))
'''


def _shard_bytes(out):
  return {os.path.basename(p): open(p, 'rb').read()
          for split in sources.SPLITS for p in token_records.shard_paths(out, split)}


def test_a_killed_prepare_resumes_per_song_and_equals_a_clean_run(
    tmp_path, codec, monkeypatch):
  wd, codec_config, _ = codec
  src = str(tmp_path / 'src')
  _plain_folder(src)
  # One shard per split, as the demo writes: per-shard resume would lose it all.
  c = _data_config(codec_config, src, records_per_shard=100)
  clean = str(tmp_path / 'clean')
  prepare_tokens.prepare_tokens_main(wd, clean, c)

  from musicjax import config as config_lib
  config_lib.save(c, str(tmp_path / 'cfg'))
  out = str(tmp_path / 'killed')
  killed = subprocess.run(
      [sys.executable, '-c', _KILLED_PREPARE, wd, out, str(tmp_path / 'cfg'), '4'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, timeout=300)
  # Train (a, b, e) was finished; eval (badmeta, c, d) was killed on c.
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert len(token_records.shard_paths(out, 'train')) == 1
  assert not token_records.shard_paths(out, 'eval')
  parts = glob.glob(os.path.join(out, '.eval-p000-00000.array_record.parts', '*'))
  assert sorted(os.path.basename(p) for p in parts) == [
      '00000.bad.json', 'settings.json']

  encoded = []
  real = token_encode.encode_item

  def counting(item, *args, **kwargs):
    encoded.append(os.path.basename(item['name']))
    return real(item, *args, **kwargs)

  monkeypatch.setattr(token_encode, 'encode_item', counting)
  audio.reset_bad_files()
  result = prepare_tokens.prepare_tokens_main(wd, out, c)
  assert encoded == ['c.wav', 'd.wav']  # only the songs the kill left undone
  assert (result['train'], result['eval'], result['bad_files']) == (3, 2, 2)
  # The song found bad before the kill is still named and counted.
  assert any(p.endswith('badmeta.wav') for p in audio.bad_files())
  assert any(p.endswith('badmeta.wav') for p in
             token_records.read_dataset_info(out)['bad_files'])
  assert _shard_bytes(out) == _shard_bytes(clean)
  assert _decoded(out) == _decoded(clean)
  assert token_records.read_dataset_info(out) == token_records.read_dataset_info(clean)
  assert not glob.glob(os.path.join(out, '.*.parts'))  # cleaned up

  # Parts of another run's settings are refused, not mixed in.
  other = str(tmp_path / 'other')
  os.makedirs(os.path.join(other, '.train-p000-00000.array_record.parts'))
  with open(os.path.join(other, '.train-p000-00000.array_record.parts',
                         'settings.json'), 'w') as f:
    json.dump({'records_per_shard': 7}, f)
  with pytest.raises(UserError, match='other settings.*new --out'):
    prepare_tokens.prepare_tokens_main(wd, other, c)


def test_record_round_trip_and_damage_without_a_codec():
  codes = np.arange(12).reshape(6, 2)
  melody = np.array([0, 1, -1, 11, 3, 3])
  meta = {'lyrics': LYRICS, 'origin': '/x/song.wav'}
  stems = {'vocal_codes': codes + 1, 'accompaniment_codes': codes + 2}
  raw = token_records.encode_record(codes, melody, meta, 40000, stems)
  r = token_records.decode_record(raw, 'shard#0')
  assert r['name'] == 'shard#0 (/x/song.wav)' and r['meta'] == meta
  assert r['codes'].dtype == np.int32  # codebook_size > 32767
  np.testing.assert_array_equal(r['codes'], codes)
  np.testing.assert_array_equal(r['vocal_codes'], codes + 1)
  np.testing.assert_array_equal(r['accompaniment_codes'], codes + 2)
  assert r['melody'].dtype == np.int8 and r['melody'].tolist() == melody.tolist()
  small = token_records.decode_record(
      token_records.encode_record(codes, melody, {}, 1024), 'n')
  assert small['codes'].dtype == np.int16 and 'vocal_codes' not in small

  damaged = token_records.decode_record(raw[:len(raw) // 2], 'shard#7')
  assert damaged['name'] == 'shard#7' and 'damaged record' in damaged['error']
  assert 'damaged record' in token_records.decode_record(b'garbage', 'g')['error']
  # A readable archive with inconsistent arrays is damaged too.
  import io
  buf = io.BytesIO()
  np.savez(buf, codes=codes, melody=melody[:3], meta_json=np.frombuffer(b'{}', np.uint8))
  assert 'melody' in token_records.decode_record(buf.getvalue(), 'n')['error']


class _FlakyLoad:
  """np.load that raises CPython 3.11's spurious threaded-AST SystemError
  (gh-106905) on its first `failures` calls, then behaves."""

  def __init__(self, failures):
    self.failures, self.calls = failures, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    if self.calls <= self.failures:
      raise SystemError('AST constructor recursion depth mismatch '
                        '(before=63, after=61)')
    return _REAL_NP_LOAD(*args, **kwargs)


_REAL_NP_LOAD = np.load


@pytest.mark.parametrize('decode', ['tokens', 'meta', 'audio'])
def test_a_spurious_system_error_does_not_drop_a_good_record(monkeypatch, decode):
  from musicjax.data import npz
  from musicjax.data import audio_records
  codes = np.arange(12).reshape(6, 2)
  if decode == 'audio':
    raw = audio_records.encode_record(np.zeros((160, 1), np.float32), 16000,
                                      {'origin': '/x'})
    fn = audio_records.decode_record
  else:
    raw = token_records.encode_record(codes, np.zeros(6), {'origin': '/x'}, 32)
    fn = token_records.decode_meta if decode == 'meta' else token_records.decode_record
  flaky = _FlakyLoad(npz.TRANSIENT_ATTEMPTS - 1)
  monkeypatch.setattr(npz.np, 'load', flaky)
  item = fn(raw, 'shard#5')
  assert 'error' not in item and item['meta'] == {'origin': '/x'}
  assert flaky.calls == npz.TRANSIENT_ATTEMPTS
  if decode == 'tokens':
    np.testing.assert_array_equal(item['codes'], codes)
  # Failing every time is not the race: reported as damage, with the reason.
  monkeypatch.setattr(npz.np, 'load', _FlakyLoad(npz.TRANSIENT_ATTEMPTS))
  err = fn(raw, 'shard#5')['error']
  assert 'damaged record (SystemError: AST constructor' in err


def test_eq_copies_round_trip_and_metadata_alone():
  codes = np.arange(12).reshape(6, 2)
  eq = np.stack([codes + 3, codes + 4])
  stems = {'vocal_codes': codes + 1, 'accompaniment_codes': codes + 2,
           'accompaniment_eq_codes': eq}
  raw = token_records.encode_record(codes, np.zeros(6), {'origin': '/x'}, 32, stems)
  r = token_records.decode_record(raw, 'n')
  assert r['accompaniment_eq_codes'].dtype == np.int16
  np.testing.assert_array_equal(r['accompaniment_eq_codes'], eq)
  assert token_records.decode_meta(raw, 'n') == {'name': 'n (/x)',
                                                  'meta': {'origin': '/x'}}
  assert 'damaged' in token_records.decode_meta(b'junk', 'n')['error']
  with pytest.raises(ValueError, match=r'accompaniment_eq_codes.*\[N, F, K\]'):
    token_records.encode_record(codes, np.zeros(6), {}, 32,
                                {'accompaniment_eq_codes': codes})
  import io
  buf = io.BytesIO()
  np.savez(buf, codes=codes, melody=np.zeros(6, np.int8),
           accompaniment_eq_codes=eq[:, :3], meta_json=np.frombuffer(b'{}', np.uint8))
  assert 'accompaniment_eq_codes' in token_records.decode_record(
      buf.getvalue(), 'n')['error']


def test_source_of_chosen_records_keeps_their_numbers(tmp_path):
  from array_record.python import array_record_module
  out = str(tmp_path / 'tokens')
  os.makedirs(out)
  for shard in range(2):
    w = array_record_module.ArrayRecordWriter(
        os.path.join(out, token_records.shard_name('train', 0, shard)), 'group_size:1')
    for i in range(3):
      w.write(token_records.encode_record(np.zeros((2, 1)), np.zeros(2),
                                          {'i': 3 * shard + i}, 32))
    w.close()
  metas = token_records.metas(out, 'train')
  assert [m['meta']['i'] for m in metas] == list(range(6))
  assert metas[4]['name'].endswith('train-*.array_record#4')
  ds = token_records.source(out, 'train', keep=[5, 1])
  assert len(ds) == 2 and [ds[i]['meta']['i'] for i in range(2)] == [5, 1]
  assert ds[0]['name'].endswith('#5') and ds[3]['name'].endswith('#1')  # repeats
  with pytest.raises(UserError, match='left'):
    token_records.source(out, 'train', keep=[])


def test_source_decodes_records_and_damaged_ones_do_not_raise(tmp_path):
  from array_record.python import array_record_module
  out = str(tmp_path / 'tokens')
  os.makedirs(out)
  w = array_record_module.ArrayRecordWriter(
      os.path.join(out, token_records.shard_name('train', 0, 0)), 'group_size:1')
  w.write(token_records.encode_record(np.zeros((4, 2)), np.zeros(4), {'i': 0}, 32))
  w.write(b'not a record')
  w.close()
  ds = token_records.source(out, 'train')
  assert len(ds) == 2
  assert ds[0]['meta'] == {'i': 0} and ds[0]['codes'].shape == (4, 2)
  assert 'damaged record' in ds[1]['error']
  with pytest.raises(UserError, match=r'no eval-p\*.*musicjax prepare --codec-workdir'):
    token_records.source(out, 'eval')


def test_missing_inputs_are_user_errors(tmp_path):
  nowhere = str(tmp_path / 'nowhere')
  with pytest.raises(UserError, match=f"{nowhere}.*musicjax prepare --codec-workdir"):
    token_records.source(nowhere, 'train')
  with pytest.raises(UserError, match='dataset.json not found'):
    token_records.read_dataset_info(str(tmp_path))
  with pytest.raises(UserError, match=f'--codec-workdir {nowhere} has no config.json'):
    prepare_tokens.prepare_tokens_main(nowhere, str(tmp_path / 'out'))
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  (untrained / 'config.json').write_text('{}')
  with pytest.raises(UserError, match='has no checkpoint'):
    prepare_tokens.prepare_tokens_main(str(untrained), str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')
