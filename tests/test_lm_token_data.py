"""The LM's token pipeline (musicjax/lm/token_data.py) on a hand-written token
dataset: window crops and END, melody alignment, the reference segment, lyrics
in both layouts, null conditions (CFG dropout), determinism and resume, bad
records, and config/dataset mismatches."""
import json
import os

import numpy as np
import pytest

import lm_fixtures as F
from musicjax.config import ConfigError
from musicjax.data import audio
from musicjax.data import sources
from musicjax.data import text as text_lib
from musicjax.data import token_records
from musicjax.lm import layout
from musicjax.lm import token_data

FRAME_RATE = 10.0
K, V = 3, 16
MAX_FRAMES = 16
REF = 4
TEXT_TOKENS = 160
SECTION_NAMES = {'verse', 'instrumental'}

# Songs as ground truth: (name, frames, sections [(name, start, end, lyrics)]).
# Sections tile the song; 'verse' ones are the chorale phrases, the others
# the gaps between them. Times are whole frames at FRAME_RATE.
SONGS = [
    ('short', 6, [('verse', 0, 3, 'Ach Gott, wie manches Herzeleid'),
                  ('instrumental', 3, 6, '')]),
    ('edge', MAX_FRAMES + 2, [
        ('verse', 0, 9, 'Befiehl du deine Wege'),
        ('verse', 9, MAX_FRAMES + 2, 'und was dein Herze kränkt')]),
    ('mid', 30, [('instrumental', 0, 4, ''),
                 ('verse', 4, 17, 'Christ lag in Todesbanden'),
                 ('verse', 17, 30, 'für unsre Sünd gegeben')]),
    ('long', 40, [('verse', 0, 8, 'Wie schön leuchtet der Morgenstern'),
                  ('verse', 8, 15, 'voll Gnad und Wahrheit von dem Herrn'),
                  ('instrumental', 15, 20, ''),
                  ('verse', 20, 26, 'die süße Wurzel Jesse'),
                  ('verse', 26, 34, 'Du Sohn Davids aus Jakobs Stamm'),
                  ('instrumental', 34, 40, '')]),
]
EVAL_SONGS = [
    ('eval_a', 12, [('verse', 0, 12, 'Nun danket alle Gott')]),
    ('eval_b', 25, [('verse', 0, 10, 'mit Herzen, Mund und Händen'),
                    ('verse', 10, 25, 'der große Dinge tut')]),
]


def _meta(name, sections):
  verses = [s for s in sections if s[0] == 'verse']
  return {
      'title': name, 'bwv': '1.6', 'id': name, 'key': 'D major',
      'time_signature': '4/4',
      'instruments': {'vocal': [{'part': 'Soprano', 'name': 'Voice Oohs'}],
                      'accompaniment': [{'part': 'Bass', 'name': 'Church Organ'}]},
      'lyrics': ' '.join(s[3] for s in verses),
      'phrases': [{'start': a / FRAME_RATE, 'end': b / FRAME_RATE, 'text': t}
                  for _, a, b, t in verses],
  }


def _song(name, frames, sections, rng):
  codes = rng.integers(0, V, (frames, K)).astype(np.int32)
  melody = rng.integers(-1, 12, frames).astype(np.int32)
  return {'name': name, 'codes': codes, 'melody': melody,
          'meta': _meta(name, sections), 'sections': sections}


def _write_shard(path, raws):
  from array_record.python import array_record_module
  w = array_record_module.ArrayRecordWriter(path, token_records.WRITER_OPTIONS)
  for raw in raws:
    w.write(raw)
  w.close()


def write_dataset(root, train, evals, extra_train=()):
  """Shards, tokenizer.json and dataset.json as `musicjax prepare` lays them
  out. `extra_train`: raw records appended to the last train shard."""
  os.makedirs(root, exist_ok=True)
  raw = lambda s: token_records.encode_record(s['codes'], s['melody'], s['meta'], V)
  # Two train shards: records are read across shard boundaries.
  half = len(train) // 2
  _write_shard(os.path.join(root, token_records.shard_name('train', 0, 0)),
               [raw(s) for s in train[:half]])
  _write_shard(os.path.join(root, token_records.shard_name('train', 0, 1)),
               [raw(s) for s in train[half:]] + list(extra_train))
  _write_shard(os.path.join(root, token_records.shard_name('eval', 0, 0)),
               [raw(s) for s in evals])
  texts = [t for s in train for t in text_lib.piece_texts(s['meta'])]
  tok = text_lib.TextTokenizer.train(
      texts, 400, os.path.join(root, token_records.TOKENIZER))
  info = {'format': token_records.FORMAT, 'codec_workdir': '/nowhere',
          'codec_step': 1, 'num_codebooks': K, 'codebook_size': V,
          'frame_rate': FRAME_RATE, 'hop_length': 800, 'sample_rate': 8000,
          'channels': 1, 'stems': False, 'data': 'hand-written',
          'tokenizer': token_records.TOKENIZER,
          'splits': {'train': len(train), 'eval': len(evals)}, 'bad_files': {}}
  with open(os.path.join(root, token_records.DATASET_INFO), 'w') as f:
    json.dump(info, f)
  return tok


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('tokens'))
  rng = np.random.default_rng(0)
  train = [_song(*s, rng) for s in SONGS]
  evals = [_song(*s, rng) for s in EVAL_SONGS]
  tok = write_dataset(root, train, evals)
  return root, tok, {s['name']: s for s in train + evals}


def _config(root, tok, layout_name='prefix', **cond):
  c = F.small_config(layout_name=layout_name, kind='tokens', path=root,
                     max_frames=MAX_FRAMES, max_text_tokens=TEXT_TOKENS,
                     reference_frames=REF, max_sections=8)
  c.model.num_codebooks, c.model.codebook_size = K, V
  c.model.text_vocab_size = tok.vocab_size + 7
  c.model.max_seq_len = 1024
  # Every tag category kept, no condition dropped, unless a test says so.
  c.cond.tag_probs = tuple((cat, 1.0) for cat, _ in c.cond.tag_probs)
  c.cond.extra_tag_prob = 1.0
  for k in ('drop_tags', 'drop_lyrics', 'drop_melody', 'drop_reference',
            'drop_all'):
    c.cond[k] = 0.0
  for k, v in cond.items():
    c.cond[k] = v
  return c


def _example(config, train=True):
  return token_data.Example(config, FRAME_RATE, train=train)


# ------------------------------------------------------------ reading examples


def _audio_slots(ex):
  """(frame slot indices, frames [n, K], END slot indices) of an example."""
  a0 = ex['audio'][:, 0]
  valid = ex['valid']
  frames = np.flatnonzero(valid & (a0 >= 0) & (a0 < V))
  ends = np.flatnonzero(valid & (a0 == layout.end_id(V)))
  return frames, ex['audio'][frames], ends


def _offsets(codes, window):
  n = len(window)
  return [a for a in range(len(codes) - n + 1)
          if np.array_equal(codes[a:a + n], window)]


def _start(song, frames):
  found = _offsets(song['codes'], frames)
  assert len(found) == 1, found       # random codes: one place in the song
  return found[0]


def _expected_melody(song, f):
  m = int(song['melody'][f])
  return layout.MELODY_SILENT if m < 0 else m


def _text_ids(ex):
  return [int(t) for t in ex['text'][ex['valid'] & (ex['text'] >= 0)]]


def _overlapping(song, start, stop):
  return [s for s in song['sections'] if s[2] > start and s[1] < stop]


# ------------------------------------------------------------------ the window


def test_window_crop_end_melody_and_reference(dataset):
  root, tok, songs = dataset
  c = _config(root, tok)
  example = _example(c)
  ds = token_records.source(root, 'train')
  by_name = {ds[i]['meta']['id']: ds[i] for i in range(len(ds))}
  assert sorted(by_name) == sorted(s[0] for s in SONGS)
  ref_id = layout.extra_id(c.model.text_vocab_size, '<ref>')
  null_ref = layout.extra_id(c.model.text_vocab_size, '<null_ref>')
  for name, song in ((n, songs[n]) for n, _, _ in SONGS):
    total = len(song['codes'])
    starts, reached, refs = set(), set(), set()
    for seed in range(30):
      ex = example(by_name[name], np.random.default_rng(seed))
      slots, frames, ends = _audio_slots(ex)
      # The window: min(max_frames, song) consecutive frames of the song.
      assert len(frames) == min(MAX_FRAMES, total)
      assert np.array_equal(np.diff(slots), np.ones(len(slots) - 1))
      start = _start(song, frames)
      stop = start + len(frames)
      starts.add(start)
      # END right after the frames iff the window reaches the song's end.
      reaches = stop == total
      reached.add(reaches)
      assert list(ends) == ([slots[-1] + 1] if reaches else []), (name, start)
      # Melody: the slot before frame f carries frame f's class; the slot
      # that predicts END carries none (NULL); no other slot has a melody.
      mel = ex['melody']
      for j, s in enumerate(slots):
        assert mel[s - 1] == _expected_melody(song, start + j), (name, start, j)
      want = set(slots - 1) | set(ends - 1)
      assert set(np.flatnonzero(mel != layout.EMPTY)) == want
      if reaches:
        assert mel[ends[0] - 1] == layout.MELODY_NULL
      # Reference: a segment of this song outside [start, stop), or none.
      ids = _text_ids(ex)
      refs.add(bool(ex['ref_valid']))
      if bool(ex['ref_valid']):
        found = _offsets(song['codes'], ex['ref_codes'])
        assert found and all(a + REF <= start or a >= stop for a in found), (
            name, start, found)
        assert ref_id in ids and null_ref not in ids
      else:
        assert np.all(ex['ref_codes'] == layout.EMPTY)
        assert null_ref in ids and ref_id not in ids
        # Only when no segment fits before or after the window.
        assert start < REF and total - stop < REF, (name, start)
    if total <= MAX_FRAMES:
      assert starts == {0} and reached == {True}
    else:
      assert len(starts) > 1, (name, starts)       # train crops are random
    if name == 'edge':
      assert reached == {True, False}
    # Too short for a segment beside the window: never a reference; long
    # enough that one always fits: always.
    assert refs == ({False} if name in ('short', 'edge') else {True}), name


def test_eval_examples_start_at_the_song_start(dataset):
  root, tok, songs = dataset
  example = _example(_config(root, tok), train=False)
  ds = token_records.source(root, 'eval')
  for i in range(len(ds)):
    rec = ds[i]
    song = songs[rec['meta']['id']]
    for seed in (0, 1):
      _, frames, ends = _audio_slots(example(rec, np.random.default_rng(seed)))
      n = min(MAX_FRAMES, len(song['codes']))
      np.testing.assert_array_equal(frames, song['codes'][:n])
      assert len(ends) == (n == len(song['codes']))


# -------------------------------------------------------------------- lyrics


def _between(ids, open_id, close_id):
  assert ids.count(open_id) == 1 and ids.count(close_id) == 1, ids
  return ids[ids.index(open_id) + 1:ids.index(close_id)]


def test_prefix_lyrics_are_those_of_the_sections_in_the_window(dataset):
  root, tok, songs = dataset
  example = _example(_config(root, tok))
  ds = token_records.source(root, 'train')
  lyrics_open, lyrics_close = tok.special_id('<lyrics>'), tok.special_id('</lyrics>')
  checked = 0
  for i in range(len(ds)):
    rec = ds[i]
    song = songs[rec['meta']['id']]
    for seed in range(6):
      ex = example(rec, np.random.default_rng(seed))
      _, frames, _ = _audio_slots(ex)
      start = _start(song, frames)
      stop = start + len(frames)
      got = tok.decode(_between(_text_ids(ex), lyrics_open, lyrics_close))
      inside = _overlapping(song, start, stop)
      want = '\n'.join(f'[{n}]\n{t}' if t else f'[{n}]' for n, _, _, t in inside)
      assert got == want, (song['name'], start)
      for n, a, b, t in song['sections']:
        if t and (b <= start or a >= stop):
          assert t not in got
      checked += len(inside) > 1
  assert checked  # some windows span several sections


def test_interleaved_sections_text_audio_and_end(dataset):
  root, tok, songs = dataset
  c = _config(root, tok, layout_name='interleaved')
  example = _example(c)
  audio_id = layout.extra_id(c.model.text_vocab_size, '<audio>')
  ds = token_records.source(root, 'train')
  ends_seen = set()
  for i in range(len(ds)):
    rec = ds[i]
    song = songs[rec['meta']['id']]
    for seed in range(6):
      ex = example(rec, np.random.default_rng(seed))
      _, frames, _ = _audio_slots(ex)
      start = _start(song, frames)
      stop = start + len(frames)
      # Valid slots as runs: ('text', ids) and ('audio', codes [n, K]).
      runs = []
      for s in np.flatnonzero(ex['valid']):
        kind = 'text' if ex['text'][s] >= 0 else 'audio'
        if ex['text'][s] >= 0 and ex['audio'][s, 0] >= 0:
          raise AssertionError(f'slot {s} has text and audio')
        item = int(ex['text'][s]) if kind == 'text' else ex['audio'][s]
        if runs and runs[-1][0] == kind:
          runs[-1][1].append(item)
        else:
          runs.append((kind, [item]))
      # The head (bos, tags, reference) is followed by the first section's
      # text: one text run, then (section text, <audio>) / audio pairs.
      inside = _overlapping(song, start, stop)
      assert [k for k, _ in runs] == ['text'] + ['audio', 'text'] * (
          len(inside) - 1) + ['audio']
      texts = [r for k, r in runs if k == 'text']
      audios = [np.asarray(r) for k, r in runs if k == 'audio']
      # Every text run ends in '<audio>', the only one in the run.
      assert all(r[-1] == audio_id and r.count(audio_id) == 1 for r in texts)
      pieces = []
      for j, (name, a, b, lyr) in enumerate(inside):
        r = texts[j]
        if j == 0:  # after the head: the head ends in the reference token
          ref_tokens = {layout.extra_id(c.model.text_vocab_size, t)
                        for t in ('<ref>', '<null_ref>')}
          cut = max(p for p, t in enumerate(r) if t in ref_tokens) + 1
          r = r[cut:]
        pieces.append(tok.decode(r[:-1]))
        want_frames = song['codes'][max(a, start):min(b, stop)]
        au = audios[j]
        ends = b <= stop
        ends_seen.add(ends)
        n = len(want_frames)
        assert len(au) == n + ends, (song['name'], start, j)
        np.testing.assert_array_equal(au[:n], want_frames)
        if ends:
          assert au[n, 0] == layout.end_id(V)
          assert np.all(au[n, 1:] == layout.EMPTY)
      assert pieces == [f'[{n}] {t}' if t else f'[{n}]' for n, _, _, t in inside]
      # Melody: the slot before frame f (a frame or a section's '<audio>')
      # carries f's class; the slot that predicts a section's END carries
      # the class of the frame after the section (NULL at the song's end).
      slots, _, end_slots = _audio_slots(ex)
      mel = ex['melody']
      for j, s in enumerate(slots):
        assert mel[s - 1] == _expected_melody(song, start + j)
      ended = [b for _, _, b, _ in inside if b <= stop]
      assert len(end_slots) == len(ended)
      for e, b in zip(end_slots, ended):
        total = len(song['codes'])
        assert mel[e - 1] == (_expected_melody(song, b) if b < total
                              else layout.MELODY_NULL)
  assert ends_seen == {True, False}


# ----------------------------------------------------------- null conditions


def _nulls(c):
  return {t: layout.extra_id(c.model.text_vocab_size, t)
          for t in ('<null_tags>', '<null_lyrics>', '<null_ref>', '<null_section>')}


@pytest.mark.parametrize('drop', ['tags', 'lyrics', 'reference', 'melody', 'all',
                                  'none'])
def test_dropped_conditions_become_their_null_tokens(dataset, drop):
  root, tok, songs = dataset
  probs = {f'drop_{drop}': 1.0} if drop != 'none' else {}
  c = _config(root, tok, **probs)
  nulls = _nulls(c)
  tag, lyr = tok.special_id('<tag>'), tok.special_id('<lyrics>')
  ref = layout.extra_id(c.model.text_vocab_size, '<ref>')
  ds = token_records.source(root, 'train')
  long = next(ds[i] for i in range(len(ds)) if ds[i]['meta']['id'] == 'long')
  gone = {'tags', 'lyrics', 'reference', 'melody'} if drop == 'all' else {drop}
  for seed in range(5):
    ex = _example(c)(long, np.random.default_rng(seed))
    ids = _text_ids(ex)
    assert (nulls['<null_tags>'] in ids, tag in ids) == (
        ('tags' in gone, 'tags' not in gone))
    assert (nulls['<null_lyrics>'] in ids, lyr in ids) == (
        ('lyrics' in gone, 'lyrics' not in gone))
    assert (nulls['<null_ref>'] in ids, ref in ids, bool(ex['ref_valid'])) == (
        ('reference' in gone,) + ('reference' not in gone,) * 2)
    mel = ex['melody'][ex['melody'] != layout.EMPTY]
    if 'melody' in gone:
      assert np.all(mel == layout.MELODY_NULL)
    else:
      assert np.sum(mel < layout.MELODY_SILENT) > len(mel) // 2
    assert nulls['<null_section>'] not in ids
  # Evaluation never drops a condition.
  ex = _example(c, train=False)(long, np.random.default_rng(0))
  ids = _text_ids(ex)
  assert not set(nulls.values()) & set(ids)
  assert tag in ids and lyr in ids and ref in ids


def test_interleaved_dropped_lyrics_give_null_sections(dataset):
  root, tok, _ = dataset
  c = _config(root, tok, layout_name='interleaved', drop_lyrics=1.0)
  nulls = _nulls(c)
  audio_id = layout.extra_id(c.model.text_vocab_size, '<audio>')
  ds = token_records.source(root, 'train')
  long = next(ds[i] for i in range(len(ds)) if ds[i]['meta']['id'] == 'long')
  ids = _text_ids(_example(c)(long, np.random.default_rng(0)))
  n = ids.count(audio_id)
  assert n >= 2
  assert ids.count(nulls['<null_section>']) == n
  # Every section's text is just its null token, before its '<audio>'.
  assert all(ids[p - 1] == nulls['<null_section>']
             for p, t in enumerate(ids) if t == audio_id)
  text = tok.decode([t for t in ids if t < tok.vocab_size])
  assert all(f'[{m}]' not in text for m in SECTION_NAMES), text


# ---------------------------------------------------------- the whole pipeline


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_eval_is_deterministic_and_train_resumes_exactly(dataset):
  root, tok, _ = dataset
  c = _config(root, tok, drop_tags=0.3, drop_lyrics=0.3, drop_melody=0.5,
              drop_reference=0.5, drop_all=0.1)
  c.cond.tag_probs = tuple((cat, 0.5) for cat, _ in c.cond.tag_probs)
  ev = lambda: iter(token_data.token_dataset(c, 'eval', 0, 1))
  first = _batches(ev(), 3)
  _assert_same(first, _batches(ev(), 3))
  assert first[0]['text'].shape == (c.data.eval_batch_size, layout.seq_len(c))

  train = lambda: iter(token_data.token_dataset(c, 'train', 0, 1))
  it = train()
  _batches(it, 3)
  state = it.get_state()
  want = _batches(it, 4)
  fresh = train()
  fresh.set_state(state)
  _assert_same(want, _batches(fresh, 4))
  # The batches do vary (the comparison above is not of constants).
  assert not all(np.array_equal(want[0]['text'], w['text']) for w in want[1:])
  _assert_same(_batches(train(), 2), _batches(train(), 2))


def test_damaged_records_are_reported_and_skipped(tmp_path):
  rng = np.random.default_rng(1)
  train = [_song(*s, rng) for s in SONGS]
  evals = [_song(*s, rng) for s in EVAL_SONGS]
  empty = token_records.encode_record(np.zeros((0, K)), np.zeros(0),
                                      _meta('empty', []), V)
  root = str(tmp_path / 'tokens')
  tok = write_dataset(root, train, evals, extra_train=[b'not a record', empty])
  c = _config(root, tok)
  c.data.eval_batch_size = c.data.batch_size = 2
  # Records of the train split: shard 0 has songs [0, half), shard 1 the
  # rest, then the damaged and the empty record.
  n_good = len(train)
  damaged = os.path.join(root, f'train-*.array_record#{n_good}')
  empty_name = os.path.join(root, f'train-*.array_record#{n_good + 1}')
  it = iter(token_data.token_dataset(c, 'train', 0, 1))
  seen = set()
  for batch in _batches(it, 3 * n_good):
    for row in range(len(batch['text'])):
      ex = {k: v[row] for k, v in batch.items()}
      _, frames, _ = _audio_slots(ex)
      owners = [s['name'] for s in train if _offsets(s['codes'], frames)]
      assert len(owners) == 1
      seen.add(owners[0])
  assert seen == {s['name'] for s in train}
  bad = audio.bad_files()
  assert 'damaged record' in bad[damaged], bad
  assert 'no frames' in bad[empty_name], bad


def test_a_split_with_no_usable_record_stops_with_a_named_error(tmp_path):
  """Every train record damaged or empty: an error naming the data, not a
  training run that waits forever for its first batch."""
  rng = np.random.default_rng(1)
  root = str(tmp_path / 'tokens')
  tok = write_dataset(root, [_song(*s, rng) for s in SONGS],
                      [_song(*s, rng) for s in EVAL_SONGS])
  empty = token_records.encode_record(np.zeros((0, K)), np.zeros(0),
                                      _meta('empty', []), V)
  _write_shard(os.path.join(root, token_records.shard_name('train', 0, 0)),
               [b'not a record'])
  _write_shard(os.path.join(root, token_records.shard_name('train', 0, 1)),
               [empty])
  it = iter(token_data.token_dataset(_config(root, tok), 'train', 0, 1))
  with pytest.raises(sources.NoUsableAudio,
                     match=f'config.data.path={root!r}: no usable token records'):
    next(it)


def test_config_must_match_the_dataset(dataset, tmp_path):
  root, tok, _ = dataset
  c = _config(root, tok)
  c.model.codebook_size = 32
  with pytest.raises(ConfigError, match=r'config\.model\.codebook_size=32.*16'):
    token_data.token_dataset(c, 'train', 0, 1)
  c = _config(root, tok)
  c.model.num_codebooks = K + 1
  with pytest.raises(ConfigError, match=r'config\.model\.num_codebooks=4'):
    token_data.token_dataset(c, 'train', 0, 1)
  c = _config(root, tok)
  c.model.text_vocab_size = tok.vocab_size - 1
  with pytest.raises(ConfigError, match=r'model\.text_vocab_size'):
    token_data.token_dataset(c, 'train', 0, 1)
  c = _config(root, tok, layout_name='interleaved')
  c.model.variant = 'single_stream'
  with pytest.raises(ConfigError, match='interleaved'):
    token_data.token_dataset(c, 'train', 0, 1)
