"""Text conditions: the byte-level BPE tokenizer, tags, sections and lyrics."""
import json
import os

import numpy as np
import pytest

from musicjax.data import song_text as st
from musicjax.data import text
from musicjax.errors import UserError
from musicjax.prepare import tokenizer
from tests import audio_fixtures as fx

# What the chorale renderer writes (musicjax/data/chorales.py), trimmed.
CHORALE_META = {
    'title': 'Valet will ich dir geben', 'bwv': '415', 'id': 'bwv415',
    'key': 'D major', 'time_signature': '4/4', 'tempo_bpm': 80.0,
    'duration_seconds': 20.0,
    'instruments': {
        'vocal': [{'part': 'Soprano', 'program': 53, 'name': 'Voice Oohs'}],
        'accompaniment': [{'part': 'Alto', 'program': 41, 'name': 'Viola'},
                          {'part': 'Tenor', 'program': 42, 'name': 'Cello'},
                          {'part': 'Bass', 'program': 19, 'name': 'Church Organ'}]},
    'lyrics': 'Valet will ich dir geben, du arge, falsche Welt; '
              'dein sündlich böses Leben durchaus mir nicht gefällt.',
    'phrases': [
        {'start': 0.0, 'end': 6.0, 'text': 'Valet will ich dir geben,'},
        {'start': 6.0, 'end': 12.0, 'text': 'du arge, falsche Welt;'},
        # a rest between phrases: 12.0 .. 13.0
        {'start': 13.0, 'end': 19.0,
         'text': 'dein sündlich böses Leben durchaus mir nicht gefällt.'},
    ],
}
GERMAN = 'Über Gräber müssen wir gehen, Straße, größte Freude: ÄÖÜ äöü ß!'
JAPANESE = '夜に駆ける、きみの声が聞こえる。カタカナ'
EMOJI = 'la la 🎵🎶 👍🏽 👨‍👩‍👧 ❤️ end'
CORPUS = [GERMAN, JAPANESE, EMOJI, '[verse]\nValet will ich dir geben,',
          st.format_tags(st.derive_tags(CHORALE_META))] * 3


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.json')
  return text.TextTokenizer.train(CORPUS, 600, path)


# ----------------------------------------------------------------- tokenizer


@pytest.mark.parametrize('s', [GERMAN, JAPANESE, EMOJI,
                               ' leading and  double spaces\t\n',
                               'unseen script: Ελληνικά, עברית, हिन्दी'])
def test_round_trips_any_script_exactly(tok, s):
  ids = tok.encode(s)
  assert tok.decode(ids) == s
  assert all(0 <= i < tok.vocab_size for i in ids)


def test_bpe_merges_learned_text(tok):
  # A trained word takes far fewer tokens than its UTF-8 bytes.
  assert len(tok.encode('Valet will ich dir geben')) < 10
  assert tok.vocab_size > text.MIN_VOCAB_SIZE


def test_special_ids_are_fixed_and_markers_are_single_tokens(tok):
  assert tok.pad_id == 0
  for i, t in enumerate(text.SPECIAL_TOKENS):
    assert tok.special_id(t) == i
  lyrics = 'oh[chorus]sing along[pre-chorus] x[end]'
  ids = tok.encode(lyrics)
  for marker in ('[chorus]', '[pre-chorus]', '[end]'):
    assert tok.special_id(marker) in ids
  assert tok.decode(ids) == lyrics
  assert tok.encode('[verse]') == [tok.special_id('[verse]')]
  assert tok.encode('<tag>genre: x</tag>')[0] == tok.special_id('<tag>')
  assert tok.encode('<tag>genre: x</tag>')[-1] == tok.special_id('</tag>')
  with pytest.raises(ValueError, match='not a special token'):
    tok.special_id('[hook]')


def test_markers_are_case_insensitive(tok):
  assert tok.encode('[Verse]\nhi [CHORUS]') == tok.encode('[verse]\nhi [chorus]')
  assert tok.encode('[Pre-Chorus]') == [tok.special_id('[pre-chorus]')]
  assert tok.decode(tok.encode('[Intro] la')) == '[intro] la'


def test_unknown_bracket_words_are_plain_text(tok):
  ids = tok.encode('[hook] yeah')
  assert len(ids) > 1
  assert not set(ids) & set(range(len(text.SPECIAL_TOKENS)))
  assert tok.decode(ids) == '[hook] yeah'


def test_save_load_same_ids(tok, tmp_path):
  loaded = text.TextTokenizer.load(tok.path)
  for s in (GERMAN, JAPANESE, EMOJI, '[Verse] Valet will ich dir geben'):
    assert loaded.encode(s) == tok.encode(s)
  assert loaded.vocab_size == tok.vocab_size
  # A directory resolves to DIR/tokenizer.json.
  assert text.TextTokenizer.load(os.path.dirname(tok.path)).encode(GERMAN) == \
      tok.encode(GERMAN)


def test_train_writes_atomically_no_temp_files_left(tmp_path):
  out = tmp_path / 'sub' / 'tok.json'
  text.TextTokenizer.train(['hallo welt'] * 5, text.MIN_VOCAB_SIZE + 10, str(out))
  assert os.listdir(tmp_path / 'sub') == ['tok.json']


def test_load_missing_and_corrupt_files_name_the_path_and_fix(tmp_path):
  missing = str(tmp_path / 'nope.json')
  with pytest.raises(UserError, match='musicjax tokenizer --config') as e:
    text.TextTokenizer.load(missing)
  assert missing in str(e.value)
  corrupt = tmp_path / 'tokenizer.json'
  corrupt.write_text('{"version": "1.0", "model": {trunc')
  with pytest.raises(UserError, match='not a readable tokenizer') as e:
    text.TextTokenizer.load(str(corrupt))
  assert str(corrupt) in str(e.value) and 'musicjax prepare' in str(e.value)


def test_load_rejects_a_foreign_tokenizer(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  foreign = Tokenizer(models.BPE())
  foreign.pre_tokenizer = pre_tokenizers.ByteLevel()
  foreign.add_special_tokens(['<s>', '<pad>'])
  path = str(tmp_path / 'foreign.json')
  foreign.save(path)
  with pytest.raises(UserError, match="'<pad>' has id 1, expected 0"):
    text.TextTokenizer.load(path)


def test_vocab_too_small_names_the_argument(tmp_path):
  with pytest.raises(UserError,
                     match=f'vocab_size=100 .*at least {text.MIN_VOCAB_SIZE}'):
    text.TextTokenizer.train(['x'], 100, str(tmp_path / 't.json'))
  assert not os.listdir(tmp_path)
  assert text.MIN_VOCAB_SIZE == 18 + 256


def test_tokenizer_main_trains_on_folder_sidecars(tmp_path):
  root = tmp_path / 'songs'
  files = fx.good_folder(str(root), 2, seconds=0.5)
  sidecars = [
      {'tags': {'genre': ['Pop'], 'mood': 'happy, upbeat'},
       'lyrics': '[Verse]\nStraße der Sehnsucht\n[Chorus]\nla la la'},
      {'tags': 'genre: enka', 'sections': [
          {'name': 'verse', 'start': 0, 'end': 0.5, 'lyrics': '夜に駆ける',
           'style': 'soft piano'}]},
  ]
  for f, meta in zip(files, sidecars):
    with open(os.path.splitext(f)[0] + '.json', 'w', encoding='utf-8') as fh:
      json.dump(meta, fh, ensure_ascii=False)
  config = fx.data_config(str(root), text_vocab_size=300)
  out = str(tmp_path / 'tok' / 'tokenizer.json')
  summary = tokenizer.tokenizer_main(config, out)
  assert summary['pieces'] == 2 and summary['path'] == out
  assert summary['requested_vocab_size'] == 300
  assert text.MIN_VOCAB_SIZE < summary['vocab_size'] <= 300
  # tags, lyrics; tags, section lyrics, section style
  assert summary['texts'] == 5
  tok = text.TextTokenizer.load(out)
  assert tok.vocab_size == summary['vocab_size']
  assert tok.decode(tok.encode('Straße 夜')) == 'Straße 夜'

  config.data.text_vocab_size = 10
  with pytest.raises(UserError, match='config.data.text_vocab_size=10'):
    tokenizer.tokenizer_main(config, out)


# ---------------------------------------------------------------------- tags


def test_derive_tags_from_chorale_fields():
  tags = st.derive_tags(CHORALE_META)
  assert tags == {
      'genre': ['chorale', 'baroque', 'sacred'],
      'timbre': ['choir'],
      'mood': ['bright'],
      'instrument': ['voice oohs', 'viola', 'cello', 'church organ'],
      'scene': ['church'],
      'region': ['german'],
      'key': ['d major'],
      'meter': ['4/4'],
  }
  minor = st.derive_tags(dict(CHORALE_META, key='b minor'))
  assert minor['mood'] == ['solemn'] and minor['key'] == ['b minor']


def test_derive_tags_without_bwv_is_not_a_chorale():
  meta = {k: v for k, v in CHORALE_META.items() if k != 'bwv'}
  tags = st.derive_tags(meta)
  assert 'genre' not in tags and 'scene' not in tags and 'region' not in tags
  assert tags['timbre'] == ['voice oohs']  # the vocal instrument
  assert st.derive_tags({}) == {}


def test_meta_tags_take_precedence_in_every_form():
  as_dict = st.derive_tags(dict(CHORALE_META, tags={
      'Genre': ['Pop', 'pop', 'Rock'], 'mood': 'happy,  Upbeat', 'bpm': 120}))
  assert as_dict == {'genre': ['pop', 'rock'], 'mood': ['happy', 'upbeat'],
                     'bpm': ['120']}
  as_string = st.derive_tags(
      {'tags': 'genre: pop, rock; mood: happy, instrument: piano, guitar'})
  assert as_string == {'genre': ['pop', 'rock'], 'mood': ['happy'],
                       'instrument': ['piano', 'guitar']}
  plain = st.derive_tags({'tags': 'dreamy, lo-fi, genre: jazz'})
  assert plain == {'genre': ['jazz'], st.UNCATEGORIZED: ['dreamy', 'lo-fi']}
  assert st.derive_tags({'tags': ['pop', 'mood: sad']}) == {
      'mood': ['sad'], st.UNCATEGORIZED: ['pop']}


def test_bad_tags_type_names_the_piece():
  with pytest.raises(UserError, match='song7: metadata key "tags"'):
    st.derive_tags({'id': 'song7', 'tags': 12})
  with pytest.raises(UserError, match='song7'):
    st.derive_tags({'id': 'song7', 'tags': {'genre': [['nested']]}})


def test_format_tags_fixed_order_and_round_trip():
  tags = {'meter': ['4/4'], 'mood': ['bright'], st.UNCATEGORIZED: ['lo-fi'],
          'genre': ['chorale', 'baroque'], 'key': ['d major']}
  s = st.format_tags(tags)
  assert s == ('<tag>genre: chorale, baroque; mood: bright; key: d major; '
               'meter: 4/4; lo-fi</tag>')
  inner = s.removeprefix('<tag>').removesuffix('</tag>')
  assert st.derive_tags({'tags': inner}) == st.derive_tags({'tags': tags})
  assert st.format_tags({}) == ''
  assert st.format_tags({'genre': []}) == ''


def test_sample_tags_prob_one_and_zero():
  tags = st.derive_tags(CHORALE_META)
  rng = np.random.default_rng(0)
  assert st.sample_tags(tags, {c: 1.0 for c in tags}, rng) == tags
  assert st.sample_tags(tags, {}, rng, extra_prob=1.0) == tags
  assert st.sample_tags(tags, {c: 0.0 for c in tags}, rng) == {}
  kept = st.sample_tags(tags, {'genre': 1.0}, rng, extra_prob=0.0)
  assert kept == {'genre': tags['genre']}


def test_sample_tags_half_keeps_about_half_independently():
  tags = {'genre': ['a'], 'mood': ['b']}
  rng = np.random.default_rng(1)
  draws = [st.sample_tags(tags, {'genre': 0.5, 'mood': 0.5}, rng)
           for _ in range(2000)]
  genre = np.array(['genre' in d for d in draws])
  mood = np.array(['mood' in d for d in draws])
  assert 0.45 < genre.mean() < 0.55 and 0.45 < mood.mean() < 0.55
  assert 0.2 < (genre & mood).mean() < 0.3  # independent: 1/4 both


def test_sample_tags_default_probs_and_determinism():
  tags = st.derive_tags(CHORALE_META)
  a = [st.sample_tags(tags, st.DEFAULT_TAG_PROBS, np.random.default_rng(5))
       for _ in range(2)]
  assert a[0] == a[1]
  rng = np.random.default_rng(2)
  n = 4000
  counts = {c: 0 for c in tags}
  for _ in range(n):
    for c in st.sample_tags(tags, st.DEFAULT_TAG_PROBS, rng):
      counts[c] += 1
  assert counts['genre'] / n == pytest.approx(0.95, abs=0.03)
  assert counts['region'] / n == pytest.approx(0.125, abs=0.03)
  assert counts['key'] / n == pytest.approx(st.EXTRA_TAG_PROB, abs=0.03)
  with pytest.raises(UserError, match="'genre' is 1.5"):
    st.sample_tags(tags, {'genre': 1.5}, rng)


# ------------------------------------------------------------------ sections


def _assert_tiles(secs, num_frames):
  assert secs[0].start_frame == 0 and secs[-1].end_frame == num_frames
  for a, b in zip(secs, secs[1:]):
    assert a.end_frame == b.start_frame
  assert all(s.num_frames > 0 for s in secs)


def test_chorale_phrases_become_verses_and_gaps_instrumental():
  fr = 12.5
  n = int(CHORALE_META['duration_seconds'] * fr)  # 250
  secs = st.sections(CHORALE_META, fr, n)
  _assert_tiles(secs, n)
  assert [(s.name, s.start_frame, s.end_frame) for s in secs] == [
      ('verse', 0, 75), ('verse', 75, 150), ('instrumental', 150, 162),
      ('verse', 162, 238), ('instrumental', 238, 250)]
  assert secs[0].lyrics == 'Valet will ich dir geben,'
  assert secs[2].lyrics == '' and secs[2].style == ''


def test_sections_clip_to_num_frames_and_offset():
  secs = st.sections(CHORALE_META, 10.0, 100)  # 10 s of a 20 s piece
  _assert_tiles(secs, 100)
  assert [(s.name, s.start_frame, s.end_frame) for s in secs] == [
      ('verse', 0, 60), ('verse', 60, 100)]
  crop = st.sections(CHORALE_META, 10.0, 50, offset_seconds=10.0)
  _assert_tiles(crop, 50)
  assert [(s.name, s.start_frame, s.end_frame, s.lyrics[:4]) for s in crop] == [
      ('verse', 0, 20, 'du a'), ('instrumental', 20, 30, ''),
      ('verse', 30, 50, 'dein')]
  assert st.sections(CHORALE_META, 10.0, 0) == []


def test_explicit_sections_sorted_named_and_styled():
  meta = {'id': 'song1', 'sections': [
      {'name': 'Chorus', 'start': 10.0, 'end': 20.0, 'lyrics': 'la la',
       'style': 'loud, full band'},
      {'name': '[Verse 1]', 'start': 2.0, 'end': 10.0, 'lyrics': 'hello'},
      {'name': 'Pre Chorus', 'start': 20.0, 'end': 22.0}]}
  secs = st.sections(meta, 1.0, 25)
  _assert_tiles(secs, 25)
  assert [(s.name, s.start_frame, s.end_frame) for s in secs] == [
      ('instrumental', 0, 2), ('verse', 2, 10), ('chorus', 10, 20),
      ('pre-chorus', 20, 22), ('instrumental', 22, 25)]
  assert secs[2].style == 'loud, full band'


def test_overlapping_sections_name_the_piece():
  meta = {'id': 'song9', 'sections': [
      {'name': 'verse', 'start': 0.0, 'end': 10.0},
      {'name': 'chorus', 'start': 8.0, 'end': 12.0}]}
  with pytest.raises(UserError, match='song9: .*overlap'):
    st.sections(meta, 12.5, 200)
  # Sub-half-frame overlaps are rounding noise.
  meta['sections'][1]['start'] = 10.0 - 0.2 / 12.5
  secs = st.sections(meta, 12.5, 200)
  _assert_tiles(secs, 200)
  with pytest.raises(UserError, match='song9: .*"start"'):
    st.sections({'id': 'song9', 'sections': [{'end': 3}]}, 12.5, 200)
  with pytest.raises(UserError, match='song9: .*ends'):
    st.sections({'id': 'song9', 'sections': [{'start': 3, 'end': 1}]}, 12.5, 200)


def test_whole_piece_section_without_timing():
  secs = st.sections({'lyrics': '[Chorus]\nla la\n[verse]\nhi'}, 12.5, 40)
  assert secs == [st.Section('chorus', 0, 40, 'la la\n[verse]\nhi')]
  secs = st.sections({'lyrics': 'just words'}, 12.5, 40)
  assert secs == [st.Section('verse', 0, 40, 'just words')]
  assert st.sections({}, 12.5, 40) == [st.Section('instrumental', 0, 40)]


def test_format_lyrics_and_section():
  secs = st.sections(CHORALE_META, 12.5, 250)
  lyrics = st.format_lyrics(secs)
  assert lyrics.startswith('[verse]\nValet will ich dir geben,\n[verse]\n'
                           'du arge, falsche Welt;\n[instrumental]\n[verse]\n')
  assert lyrics.endswith('gefällt.\n[instrumental]')
  s = st.Section('chorus', 0, 10, 'la la', 'loud')
  assert st.format_section(s) == '[chorus] <style>loud</style> la la'
  assert st.format_section(st.Section('instrumental', 0, 10)) == '[instrumental]'
  assert st.format_section(st.Section('verse', 0, 1, 'x')) == '[verse] x'


def test_formatted_text_markers_tokenize_as_single_tokens(tok):
  secs = st.sections(CHORALE_META, 12.5, 250)
  ids = tok.encode(st.format_lyrics(secs))
  assert ids.count(tok.special_id('[verse]')) == 3
  assert ids.count(tok.special_id('[instrumental]')) == 2
  assert tok.decode(ids) == st.format_lyrics(secs)


def test_parse_lyrics_file():
  lyrics = ('Intro words before a marker\n\n'
            '[Verse 1]\nValet will ich dir geben,\ndu arge, falsche Welt;\n'
            '[Chorus: all] sing\nalong\n'
            '[instrumental]\n'
            '[Pre-Chorus]\nhere\n')
  assert st.parse_lyrics_file(lyrics) == [
      ('[verse]', 'Intro words before a marker'),
      ('[verse]', 'Valet will ich dir geben,\ndu arge, falsche Welt;'),
      ('[chorus]', 'sing\nalong'),
      ('[instrumental]', ''),
      ('[pre-chorus]', 'here')]
  assert st.parse_lyrics_file('') == []
  assert st.parse_lyrics_file('  \n\n') == []
  assert st.parse_lyrics_file('夜に駆ける') == [('[verse]', '夜に駆ける')]
