"""The accomp token pipeline (musicjax/accomp/data.py) on hand-written stem
records: same-frame windows, the non-overlapping reference (plain or EQ'd),
padding, tags, unusable songs, the quality filter, determinism and resume,
and per-process shares."""
import json
import logging
import os

import ml_collections
import numpy as np
import pytest

from musicjax.accomp import data as accomp_data
from musicjax.config import ConfigError, base_config
from musicjax.data import audio
from musicjax.data import sources
from musicjax.data import song_text
from musicjax.data import text as text_lib
from musicjax.data import token_records

FRAME_RATE = 10.0
K, K_DATA, V = 3, 4, 64      # the model reads the first 3 of 4 codebooks
MAX_FRAMES = 16
REF = 4
TEXT_TOKENS = 24
EQ_COPIES = 2
TAGS = 'genre: pop, rock; mood: happy; instrument: piano'
GOOD_STATS = {'vocal_rms_db': -20.0, 'accompaniment_rms_db': -15.0,
              'vocal_active': 0.8, 'accompaniment_active': 0.9}

# (id, frames): train songs shorter than the window, one just over it (no
# reference ever fits beside the window), and longer ones.
TRAIN = [('short', 6), ('edge', MAX_FRAMES + 2), ('mid', 30), ('long', 40)]
EVAL = [('eval_a', 12), ('eval_b', 25), ('eval_c', 20), ('eval_d', 33)]


def _phrases(frames, n):
  step = frames / FRAME_RATE / max(n, 1)
  return [{'start': i * step, 'end': (i + 1) * step, 'text': f'line {i}'}
          for i in range(n)]


def song(name, frames, rng, *, stats=GOOD_STATS, stems=True, eq=EQ_COPIES,
         sections=2, **meta):
  """A record's arrays and metadata, with random (so unique) codes."""
  draw = lambda *shape: rng.integers(0, V, shape).astype(np.int32)
  m = {'id': name, 'origin': f'/songs/{name}', 'title': name, 'tags': TAGS,
       'num_frames': frames,
       'frame_rate': FRAME_RATE, 'phrases': _phrases(frames, sections)}
  if stats is not None:
    m['stem_stats'] = dict(stats)
  m.update(meta)
  s = {'name': name, 'codes': draw(frames, K_DATA),
       'melody': np.zeros(frames, np.int32), 'meta': m, 'stems': None}
  if stems:
    s['stems'] = {'vocal_codes': draw(frames, K_DATA),
                  'accompaniment_codes': draw(frames, K_DATA)}
    if eq:
      s['stems']['accompaniment_eq_codes'] = draw(eq, frames, K_DATA)
  return s


def _raw(s):
  return token_records.encode_record(s['codes'], s['melody'], s['meta'], V,
                                     s['stems'])


def _write_shard(path, raws):
  from array_record.python import array_record_module
  w = array_record_module.ArrayRecordWriter(path, token_records.WRITER_OPTIONS)
  for raw in raws:
    w.write(raw)
  w.close()


def write_dataset(root, train, evals, extra_train=(), stems=True):
  """Shards (train split over two), tokenizer.json and dataset.json, as
  `musicjax prepare --stems` lays them out."""
  os.makedirs(root, exist_ok=True)
  half = len(train) // 2
  _write_shard(os.path.join(root, token_records.shard_name('train', 0, 0)),
               [_raw(s) for s in train[:half]])
  _write_shard(os.path.join(root, token_records.shard_name('train', 0, 1)),
               [_raw(s) for s in train[half:]] + list(extra_train))
  _write_shard(os.path.join(root, token_records.shard_name('eval', 0, 0)),
               [_raw(s) for s in evals])
  texts = [t for s in train for t in text_lib.piece_texts(s['meta'])]
  tok = text_lib.TextTokenizer.train(
      texts, 400, os.path.join(root, token_records.TOKENIZER))
  info = {'format': token_records.FORMAT, 'codec_workdir': '/nowhere',
          'codec_step': 1, 'num_codebooks': K_DATA, 'codebook_size': V,
          'frame_rate': FRAME_RATE, 'hop_length': 800, 'sample_rate': 8000,
          'channels': 1, 'stems': stems, 'data': 'hand-written',
          'tokenizer': token_records.TOKENIZER,
          'splits': {'train': len(train), 'eval': len(evals)}, 'bad_files': {}}
  with open(os.path.join(root, token_records.DATASET_INFO), 'w') as f:
    json.dump(info, f)
  return tok


def config(root, tok, **data):
  """base_config + the accomp data keys, a tiny model section, the LM's
  tag keep-probabilities (all 1 unless a test says so)."""
  c = base_config()
  c.task = 'accomp'
  c.data.update(accomp_data.default_data_config())
  c.data.kind, c.data.path = 'tokens', root
  c.data.max_frames, c.data.reference_frames = MAX_FRAMES, REF
  c.data.max_text_tokens = TEXT_TOKENS
  c.data.batch_size = c.data.eval_batch_size = 4
  for k, v in data.items():
    c.data[k] = v
  c.model = ml_collections.ConfigDict({
      'num_codebooks': K, 'codebook_size': V, 'frame_rate': FRAME_RATE,
      'text_vocab_size': tok.vocab_size})
  c.cond = ml_collections.ConfigDict({
      'tag_probs': tuple((cat, 1.0) for cat in song_text.TAG_CATEGORIES),
      'extra_tag_prob': 1.0})
  return c


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('stems'))
  rng = np.random.default_rng(0)
  train = [song(n, f, rng) for n, f in TRAIN]
  evals = [song(n, f, rng) for n, f in EVAL]
  tok = write_dataset(root, train, evals)
  return root, tok, {s['name']: s for s in train + evals}


def _records(root, split):
  ds = token_records.source(root, split)
  return {ds[i]['meta']['id']: ds[i] for i in range(len(ds))}


def _offsets(codes, window):
  n = len(window)
  return [a for a in range(len(codes) - n + 1)
          if np.array_equal(codes[a:a + n], window)]


def _start(codes, window):
  found = _offsets(codes, window)
  assert len(found) == 1, found  # random codes: one place in the song
  return found[0]


def _owner(songs, ex):
  """The song whose vocal holds the example's window."""
  n = int(ex['valid'].sum())
  owners = [name for name, s in songs.items()
            if _offsets(s['stems']['vocal_codes'][:, :K], ex['vocal'][:n])]
  assert len(owners) == 1, owners
  return owners[0]


def _rows(batch):
  return [{k: v[i] for k, v in batch.items()} for i in range(len(batch['valid']))]


# ------------------------------------------------------------ the example


def _check_contract(ex):
  shapes = {'vocal': ((MAX_FRAMES, K), np.int32), 'accomp': ((MAX_FRAMES, K), np.int32),
            'valid': ((MAX_FRAMES,), bool), 'text': ((TEXT_TOKENS,), np.int32),
            'ref': ((REF, K), np.int32), 'ref_valid': ((), bool)}
  assert sorted(ex) == sorted(shapes)
  for key, (shape, dtype) in shapes.items():
    assert np.shape(ex[key]) == shape and np.asarray(ex[key]).dtype == dtype, key


def test_windows_padding_and_reference_in_train(dataset):
  root, tok, songs = dataset
  example = accomp_data.Example(config(root, tok), FRAME_RATE, train=True)
  for name, record in _records(root, 'train').items():
    st = songs[name]['stems']
    vocal, acc = st['vocal_codes'][:, :K], st['accompaniment_codes'][:, :K]
    total = len(vocal)
    w = min(MAX_FRAMES, total)
    starts, refs = set(), set()
    for seed in range(40):
      ex = example(record, np.random.default_rng(seed))
      _check_contract(ex)
      # The window: w frames, the SAME frames of vocal and accompaniment.
      assert ex['valid'].tolist() == [True] * w + [False] * (MAX_FRAMES - w)
      start = _start(vocal, ex['vocal'][:w])
      starts.add(start)
      np.testing.assert_array_equal(ex['accomp'][:w], acc[start:start + w])
      assert np.all(ex['vocal'][w:] == -1) and np.all(ex['accomp'][w:] == -1)
      # The reference: accompaniment frames outside the window, or none.
      refs.add(bool(ex['ref_valid']))
      if ex['ref_valid']:
        found = _offsets(acc, ex['ref'])
        assert found and all(a + REF <= start or a >= start + w for a in found)
      else:
        assert np.all(ex['ref'] == -1)
        assert start < REF and total - (start + w) < REF, (name, start)
    assert starts == {0} if total <= MAX_FRAMES else len(starts) > 1
    assert refs == ({False} if name in ('short', 'edge') else {True}), name


def test_eq_copies_feed_the_accompaniment_and_the_reference_together(dataset):
  root, tok, songs = dataset
  example = accomp_data.Example(config(root, tok, eq_prob=1.0), FRAME_RATE,
                                train=True)
  record = _records(root, 'train')['long']
  st = songs['long']['stems']
  copies = st['accompaniment_eq_codes'][:, :, :K]
  used = set()
  for seed in range(30):
    ex = example(record, np.random.default_rng(seed))
    start = _start(st['vocal_codes'][:, :K], ex['vocal'][:MAX_FRAMES])
    which = [n for n in range(EQ_COPIES)
             if np.array_equal(ex['accomp'], copies[n][start:start + MAX_FRAMES])]
    assert len(which) == 1
    used.add(which[0])
    found = _offsets(copies[which[0]], ex['ref'])
    assert found and all(a + REF <= start or a >= start + MAX_FRAMES for a in found)
  assert used == set(range(EQ_COPIES))
  # Evaluation never uses a copy.
  ex = accomp_data.Example(config(root, tok, eq_prob=1.0), FRAME_RATE,
                           train=False)(record, np.random.default_rng(0))
  np.testing.assert_array_equal(ex['accomp'],
                                st['accompaniment_codes'][:MAX_FRAMES, :K])


def test_eq_prob_without_copies_warns_once(tmp_path, caplog):
  rng = np.random.default_rng(5)
  train = [song(f's{i}', 30, rng, eq=0) for i in range(3)]
  root = str(tmp_path / 'plain')
  tok = write_dataset(root, train, train[:1])
  accomp_data._warned.clear()
  example = accomp_data.Example(config(root, tok, eq_prob=1.0), FRAME_RATE, True)
  with caplog.at_level(logging.WARNING, logger='musicjax.data'):
    for record in _records(root, 'train').values():
      ex = example(record, np.random.default_rng(0))
      assert ex is not None
  warnings = [r for r in caplog.records if 'eq_copies' in r.getMessage()]
  assert len(warnings) == 1 and 'config.data.eq_prob=1.0' in warnings[0].getMessage()


def test_eval_window_reference_and_all_tags(dataset):
  root, tok, songs = dataset
  c = config(root, tok)
  c.cond.tag_probs = tuple((cat, 0.0) for cat in song_text.TAG_CATEGORIES)
  example = accomp_data.Example(c, FRAME_RATE, train=False)
  want_text = song_text.format_tags(song_text.derive_tags({'tags': TAGS}))
  for name, record in _records(root, 'eval').items():
    st = songs[name]['stems']
    total = len(st['vocal_codes'])
    w = min(MAX_FRAMES, total)
    for seed in (0, 1):
      ex = example(record, np.random.default_rng(seed))
      np.testing.assert_array_equal(ex['vocal'][:w], st['vocal_codes'][:w, :K])
      np.testing.assert_array_equal(ex['accomp'][:w],
                                    st['accompaniment_codes'][:w, :K])
      # The first segment after the window, when one fits.
      fits = total - w >= REF
      assert bool(ex['ref_valid']) == fits
      if fits:
        np.testing.assert_array_equal(ex['ref'],
                                      st['accompaniment_codes'][w:w + REF, :K])
      ids = ex['text'][ex['text'] >= 0].tolist()
      assert tok.decode(ids) == want_text[:len(tok.decode(ids))]
      assert np.all(ex['text'][len(ids):] == -1)


def test_tag_text_is_sampled_in_train_and_cut_to_length(dataset):
  root, tok, _ = dataset
  record = _records(root, 'train')['mid']
  full = song_text.format_tags(song_text.derive_tags({'tags': TAGS}))
  full_ids = tok.encode(full)
  # Long enough for the whole text: it round-trips, the rest is padding.
  c = config(root, tok, max_text_tokens=len(full_ids) + 3)
  ex = accomp_data.Example(c, FRAME_RATE, True)(record, np.random.default_rng(0))
  assert ex['text'].tolist() == full_ids + [-1] * 3
  # Shorter: cut.
  c = config(root, tok, max_text_tokens=5)
  ex = accomp_data.Example(c, FRAME_RATE, True)(record, np.random.default_rng(0))
  assert ex['text'].tolist() == full_ids[:5]
  # Categories kept with their probabilities: none kept -> no text at all.
  c = config(root, tok)
  c.cond.tag_probs = tuple((cat, 0.0) for cat in song_text.TAG_CATEGORIES)
  c.cond.extra_tag_prob = 0.0
  ex = accomp_data.Example(c, FRAME_RATE, True)(record, np.random.default_rng(0))
  assert np.all(ex['text'] == -1)
  c.cond.tag_probs = tuple((cat, 0.5) for cat in song_text.TAG_CATEGORIES)
  texts = {tuple(accomp_data.Example(c, FRAME_RATE, True)(
      record, np.random.default_rng(s))['text']) for s in range(20)}
  assert len(texts) > 2


# ------------------------------------------------------------ the pipeline


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_deterministic_and_train_resumes_exactly(dataset):
  root, tok, _ = dataset
  c = config(root, tok, eq_prob=0.5)
  c.cond.tag_probs = tuple((cat, 0.5) for cat in song_text.TAG_CATEGORIES)
  ev = lambda: iter(accomp_data.accomp_dataset(c, 'eval', 0, 1))
  first = _batches(ev(), 3)
  _assert_same(first, _batches(ev(), 3))
  _check_contract(_rows(first[0])[0])
  assert first[0]['vocal'].shape == (c.data.eval_batch_size, MAX_FRAMES, K)

  train = lambda: iter(accomp_data.accomp_dataset(c, 'train', 0, 1))
  it = train()
  _batches(it, 3)
  state = it.get_state()
  want = _batches(it, 4)
  fresh = train()
  fresh.set_state(state)
  _assert_same(want, _batches(fresh, 4))
  assert not all(np.array_equal(want[0]['vocal'], w['vocal']) for w in want[1:])
  _assert_same(_batches(train(), 2), _batches(train(), 2))


@pytest.mark.parametrize('split', ['train', 'eval'])
def test_two_processes_get_disjoint_covering_shares(dataset, split):
  root, tok, songs = dataset
  c = config(root, tok)
  n = len(TRAIN if split == 'train' else EVAL)
  shares = []
  for index in range(2):
    it = iter(accomp_data.accomp_dataset(c, split, index, 2))
    rows = [r for b in _batches(it, n // 2 // 2) for r in _rows(b)]  # local batch 2
    shares.append([_owner(songs, r) for r in rows])
  assert not set(shares[0]) & set(shares[1])
  assert sorted(shares[0] + shares[1]) == sorted(
      name for name, _ in (TRAIN if split == 'train' else EVAL))


def test_unusable_songs_are_reported_and_skipped(tmp_path):
  rng = np.random.default_rng(1)
  good = [song(f'good{i}', 20 + i, rng) for i in range(4)]
  silent = song('silent', 25, rng, stats=dict(GOOD_STATS, vocal_rms_db=-90.0))
  no_stems = song('no_stems', 25, rng, stems=False)
  no_stats = song('no_stats', 25, rng, stats=None)
  empty = song('empty', 0, rng, sections=0)
  bad_meta = song('bad_meta', 25, rng, tags=True)
  root = str(tmp_path / 'stems')
  extra = [_raw(s) for s in (silent, no_stems, no_stats, empty, bad_meta)]
  tok = write_dataset(root, good, good[:1], extra_train=extra + [b'not a record'])
  c = config(root, tok)
  c.data.batch_size = 2
  seen = set()
  it = iter(accomp_data.accomp_dataset(c, 'train', 0, 1))
  for batch in _batches(it, 3 * len(good)):
    seen.update(_owner({s['name']: s for s in good}, r) for r in _rows(batch))
  assert seen == {s['name'] for s in good}   # every good song, nothing else
  bad = {k: v for k, v in audio.bad_files().items() if k.startswith(root)}
  name = lambda i: os.path.join(root, f'train-*.array_record#{i}')
  first = len(good)   # the extra records follow the good ones
  reasons = {k.split(' (')[0]: v for k, v in bad.items()}
  assert f'{name(first)} (/songs/silent)' in bad  # named by record and origin
  assert 'silent vocal: RMS -90.0 dBFS' in reasons[name(first)]
  assert 'min_vocal_db=-50.0' in reasons[name(first)]
  assert '--stems' in reasons[name(first + 1)] and 'no vocal' in reasons[name(first + 1)]
  assert 'stem_stats' in reasons[name(first + 2)]
  assert '--stems' in reasons[name(first + 2)]
  assert reasons[name(first + 3)] == 'no frames'
  assert 'tags' in reasons[name(first + 4)]
  assert 'damaged record' in reasons[name(first + 5)]
  assert len(bad) == 6


def test_a_split_with_no_usable_song_stops_with_a_named_error(tmp_path):
  """Every train record damaged or without stems: an error naming the
  data, not a training run that waits forever for its first batch."""
  rng = np.random.default_rng(1)
  good = [song(f'good{i}', 20 + i, rng) for i in range(2)]
  root = str(tmp_path / 'stems')
  tok = write_dataset(root, good, good[:1])
  _write_shard(os.path.join(root, token_records.shard_name('train', 0, 0)),
               [b'not a record'])
  _write_shard(os.path.join(root, token_records.shard_name('train', 0, 1)),
               [_raw(song('no_stems', 25, rng, stems=False))])
  it = iter(accomp_data.accomp_dataset(config(root, tok), 'train', 0, 1))
  with pytest.raises(sources.NoUsableAudio,
                     match=f'config.data.path={root!r}: no usable songs'):
    next(it)


def _quality_dataset(tmp_path):
  rng = np.random.default_rng(2)
  low = lambda **kw: dict(GOOD_STATS, **kw)
  train = [
      song('ok', 30, rng),
      song('ok_edge', 20, rng, stats=low(vocal_active=0.5,
                                        accompaniment_active=0.5)),
      song('too_short', 19, rng),
      song('quiet_vocal', 30, rng, stats=low(vocal_active=0.4)),
      song('sparse_accomp', 30, rng, stats=low(accompaniment_active=0.1)),
      song('one_section', 30, rng, sections=1),
      song('nothing_right', 10, rng, stats=low(vocal_active=0.0), sections=0),
      song('no_stats', 30, rng, stats=None),   # passes; reported as unusable
  ]
  root = str(tmp_path / 'quality')
  tok = write_dataset(root, train, train[:2])
  c = config(root, tok)
  q = c.data.quality
  q.enabled = True
  q.min_seconds, q.min_vocal_active = 2.0, 0.5
  q.min_accompaniment_active, q.min_sections = 0.5, 2
  return root, tok, c, {s['name']: s for s in train}


def test_quality_filter_keeps_exactly_the_songs_that_pass(tmp_path, caplog):
  root, _, c, songs = _quality_dataset(tmp_path)
  metas = token_records.metas(root, 'train')
  fails = {m['meta']['id']: accomp_data.quality_failures(
      m['meta'], c.data.quality, FRAME_RATE) for m in metas}
  assert fails == {
      'ok': [], 'ok_edge': [], 'no_stats': None,
      'too_short': ['min_seconds'],
      'quiet_vocal': ['min_vocal_active'],
      'sparse_accomp': ['min_accompaniment_active'],
      'one_section': ['min_sections'],
      'nothing_right': ['min_seconds', 'min_vocal_active', 'min_sections']}
  with caplog.at_level(logging.INFO, logger='musicjax.data'):
    it = iter(accomp_data.accomp_dataset(c, 'train', 0, 1))
  summary = [r.getMessage() for r in caplog.records if 'quality filter' in r.getMessage()]
  assert len(summary) == 1
  assert 'train quality filter' in summary[0]
  assert 'kept 3 of 8 songs (1 not judged' in summary[0]
  assert 'min_seconds (2.0): 2' in summary[0] and 'min_sections (2): 2' in summary[0]
  seen = set()
  for batch in _batches(it, 6):
    seen.update(_owner(songs, r) for r in _rows(batch))
  assert seen == {'ok', 'ok_edge'}
  # Judged unusable instead, by name.
  assert any(k.endswith('(/songs/no_stats)') for k in audio.bad_files())
  # Off: every usable song trains.
  c.data.quality.enabled = False
  it = iter(accomp_data.accomp_dataset(c, 'train', 0, 1))
  seen = {_owner(songs, r) for b in _batches(it, 12) for r in _rows(b)}
  assert seen == set(songs) - {'no_stats'}


def test_quality_filter_that_keeps_nothing_is_a_config_error(tmp_path):
  _, _, c, _ = _quality_dataset(tmp_path)
  c.data.quality.min_seconds = 1000.0
  with pytest.raises(ConfigError, match=r'kept none.*quality\.enabled=false'):
    accomp_data.accomp_dataset(c, 'train', 0, 1)


def test_dataset_must_have_stems_and_match_the_model(dataset, tmp_path):
  root, tok, _ = dataset
  c = config(root, tok)
  c.model.codebook_size = 2 * V
  with pytest.raises(ConfigError, match=r'config\.model\.codebook_size'):
    accomp_data.accomp_dataset(c, 'train', 0, 1)
  c = config(root, tok)
  c.model.num_codebooks = K_DATA + 1
  with pytest.raises(ConfigError, match=r'config\.model\.num_codebooks'):
    accomp_data.accomp_dataset(c, 'train', 0, 1)
  c = config(root, tok)
  c.model.frame_rate = 2 * FRAME_RATE
  with pytest.raises(ConfigError, match=r'frame_rate=20\.0.*10\.0'):
    accomp_data.accomp_dataset(c, 'train', 0, 1)
  c = config(root, tok, eq_prob=1.5)
  with pytest.raises(ConfigError, match=r'config\.data\.eq_prob'):
    accomp_data.accomp_dataset(c, 'train', 0, 1)
  # Prepared without --stems: recorded in dataset.json, or (older datasets)
  # seen in the first record.
  rng = np.random.default_rng(3)
  plain = [song(f'p{i}', 20, rng, stems=False) for i in range(2)]
  for recorded in (False, None):
    where = str(tmp_path / f'plain_{recorded}')
    tok2 = write_dataset(where, plain, plain, stems=recorded)
    if recorded is None:
      path = os.path.join(where, token_records.DATASET_INFO)
      with open(path) as f:
        info = json.load(f)
      del info['stems']
      with open(path, 'w') as f:
        json.dump(info, f)
    with pytest.raises(ConfigError, match=r'musicjax prepare .*--stems'):
      accomp_data.accomp_dataset(config(where, tok2), 'train', 0, 1)


def test_default_data_config_keys():
  d = accomp_data.default_data_config()
  assert (d.max_frames, d.reference_frames, d.max_text_tokens) == (250, 125, 32)
  assert (d.tokenizer, d.min_vocal_db, d.eq_prob) == ('', -50.0, 0.0)
  assert d.quality.enabled is False
  assert set(d.quality) == {'enabled', *accomp_data.QUALITY_RULES}
  # It merges over base_config's data section without clashes.
  c = base_config()
  c.data.update(d)
  assert c.data.batch_size and c.data.max_frames == 250
