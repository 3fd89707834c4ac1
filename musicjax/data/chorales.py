"""The built-in dataset: Bach chorales from the music21 corpus, rendered to audio.

Each chorale with plain Soprano/Alto/Tenor/Bass parts becomes three mono FLAC
stems in a cache, rendered once with tinysoundfont and the General MIDI
soundfont that ships in the pretty_midi wheel:

  <cache_dir>/chorales-<sr>hz-<tempo>bpm/<id>/vocal.flac          soprano
  <cache_dir>/chorales-<sr>hz-<tempo>bpm/<id>/accompaniment.flac  alto+tenor+bass
  <cache_dir>/chorales-<sr>hz-<tempo>bpm/<id>/mix.flac            vocal+accompaniment
  <cache_dir>/chorales-<sr>hz-<tempo>bpm/<id>/meta.json

Pieces that cannot be used (not plain SATB) get a `skip.json` with the reason,
so a later run parses nothing it has already seen.

Split: a chorale is in 'eval' iff the integer part of its BWV number is
divisible by `config.data.eval_every_nth_bwv` (BWV 40.8 -> 40); two versions of
one BWV number therefore never land in different splits.

Timing: the score is rendered at a constant `config.data.render_tempo_bpm`
quarter notes per minute. Fermatas do not lengthen notes (kept simple); they
only mark phrase ends in the lyrics metadata. Repeats are rendered as written
(not expanded).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from typing import Any

import ml_collections
import numpy as np
import soundfile as sf
from tqdm import tqdm

from musicjax import fileio
from musicjax.data import locks
from musicjax.errors import UserError

logger = logging.getLogger('musicjax.data')

# part name -> (stem, MIDI channel, GM program (0-based), GM name, velocity).
# Soprano is voice-like so the vocal stem sounds sung; the lower voices are
# strings plus an organ bass, a common chorale accompaniment.
PART_VOICES: dict[str, tuple[str, int, int, str, int]] = {
    'Soprano': ('vocal', 0, 53, 'Voice Oohs', 100),
    'Alto': ('accompaniment', 1, 41, 'Viola', 80),
    'Tenor': ('accompaniment', 2, 42, 'Cello', 80),
    'Bass': ('accompaniment', 3, 19, 'Church Organ', 75),
}
STEMS = ('vocal', 'accompaniment', 'mix')
SATB = ('Soprano', 'Alto', 'Tenor', 'Bass')
# Seconds rendered after the last note-off so releases decay naturally.
RELEASE_SECONDS = 1.0
# The mix is scaled so its peak sits here (stems by the same factor).
PEAK_LEVEL = 0.9
SOUNDFONT_NAME = 'TimGM6mb.sf2'
_FORMAT_VERSION = 1


def soundfont_path() -> str:
  spec = importlib.util.find_spec('pretty_midi')
  if spec is None or spec.origin is None:
    raise RuntimeError('pretty_midi is not installed; it ships the soundfont '
                       f'{SOUNDFONT_NAME} used to render the chorales')
  return os.path.join(os.path.dirname(spec.origin), SOUNDFONT_NAME)


def bwv_integer(bwv: str) -> int:
  """'269' -> 269, '153.1' -> 153, '248.12-2' -> 248."""
  m = re.match(r'\d+', bwv)
  if not m:
    raise ValueError(f'not a BWV number: {bwv!r}')
  return int(m.group(0))


def split_of(bwv: str, eval_every_nth_bwv: int) -> str:
  return 'eval' if bwv_integer(bwv) % eval_every_nth_bwv == 0 else 'train'


def candidates() -> list[tuple[str, str]]:
  """(piece id, corpus name) of every chorale, in a stable order, unparsed."""
  # Deferred here and below: music21 is slow to import; only rendering needs it.
  from music21 import corpus  # pylint: disable=g-import-not-at-top
  seen = set()
  out = []
  for name in corpus.chorales.Iterator(returnType='filename'):
    if name in seen:  # the iterator lists some chorales twice
      continue
    seen.add(name)
    out.append((name.split('/')[-1], name))
  return out


def bwv_of(piece_id: str) -> str:
  return piece_id.removeprefix('bwv')


def cache_root(config: ml_collections.ConfigDict) -> str:
  d = config.data
  return os.path.join(os.path.expanduser(d.cache_dir),
                      f'chorales-{d.sample_rate}hz-{d.render_tempo_bpm:g}bpm')


def split_limits(config: ml_collections.ConfigDict) -> dict[str, int | None]:
  """Pieces per split for `data.max_pieces` (None = all).

  The budget is shared in proportion to the split sizes (1 in
  eval_every_nth_bwv goes to eval), with at least one piece in each split, so
  max_pieces=1 gives one train and one eval piece.
  """
  n = config.data.max_pieces
  if n <= 0:
    return {'train': None, 'eval': None}
  n_eval = max(1, round(n / config.data.eval_every_nth_bwv))
  return {'train': max(1, n - n_eval), 'eval': n_eval}


# ------------------------------------------------------------------ scores


def _first(stream, cls_name: str):
  found = stream.recurse().getElementsByClass(cls_name)
  return found[0] if len(found) else None


def _lyric_of(note) -> tuple[str, str] | None:
  lyrics = [l for l in note.lyrics if l.text]
  if not lyrics:
    return None
  first = next((l for l in lyrics if l.number == 1), lyrics[0])
  return first.text, first.syllabic or 'single'


def _join(syllables: list[tuple[str, str]]) -> str:
  text = ''
  for t, syllabic in syllables:
    text += t
    if syllabic in ('single', 'end'):
      text += ' '
  return text.strip()


def _phrases(soprano_notes, seconds_per_quarter: float) -> list[dict[str, Any]]:
  """Lyric phrases split at fermatas: [{start, end, text}] in seconds."""
  phrases, current, start = [], [], None
  for n in soprano_notes:
    if start is None:
      start = float(n.offset) * seconds_per_quarter
    lyric = _lyric_of(n)
    if lyric:
      current.append(lyric)
    if any(type(e).__name__ == 'Fermata' for e in n.expressions):
      end = float(n.offset + n.quarterLength) * seconds_per_quarter
      phrases.append({'start': start, 'end': end, 'text': _join(current)})
      current, start = [], None
  if start is not None:
    last = soprano_notes[-1]
    end = float(last.offset + last.quarterLength) * seconds_per_quarter
    phrases.append({'start': start, 'end': end, 'text': _join(current)})
  return phrases


def _title(score, bwv: str) -> str:
  from music21 import corpus  # pylint: disable=g-import-not-at-top
  by_bwv = corpus.chorales.ChoraleList().byBWV
  for key in (bwv, bwv_integer(bwv) if bwv.isdigit() else None):
    if key is not None and key in by_bwv:
      return by_bwv[key]['title']
  md = score.metadata
  return (md.title or md.movementName or f'BWV {bwv}') if md else f'BWV {bwv}'


def parse_piece(corpus_name: str, tempo_bpm: float) -> dict[str, Any]:
  """Parses one chorale into note events and metadata.

  Raises:
    ValueError: if the piece does not have plain SATB parts (the reason).
  """
  from music21 import corpus, text  # pylint: disable=g-import-not-at-top
  score = corpus.parse(corpus_name)
  names = [p.partName or p.id for p in score.parts]
  if tuple(names) != SATB:
    raise ValueError(f'parts are {names}, not plain Soprano/Alto/Tenor/Bass')
  spq = 60.0 / tempo_bpm
  events: dict[str, list[tuple[float, float, int, int, int]]] = {}
  soprano_notes = None
  for part in score.parts:
    stem, chan, _, _, vel = PART_VOICES[part.partName or part.id]
    notes = [n for n in part.flatten().stripTies().notes if n.quarterLength > 0]
    if part.partName == 'Soprano' or part.id == 'Soprano':
      soprano_notes = notes
    for n in notes:
      on = float(n.offset) * spq
      off = float(n.offset + n.quarterLength) * spq
      for p in n.pitches:
        events.setdefault(stem, []).append((on, off, int(p.midi), chan, vel))
  if not soprano_notes:
    raise ValueError('the soprano part has no notes')
  bwv = bwv_of(corpus_name.split('/')[-1])
  key = _first(score, 'KeySignature')
  if key is not None and not hasattr(key, 'tonic'):
    key = key.asKey()
  ts = _first(score, 'TimeSignature')
  end = max(e[1] for evs in events.values() for e in evs)
  meta = {
      'title': _title(score, bwv),
      'bwv': bwv,
      'source': f'music21 corpus {corpus_name}',
      'key': f'{key.tonic.name} {key.mode}' if key is not None else None,
      'time_signature': ts.ratioString if ts is not None else None,
      'tempo_bpm': tempo_bpm,
      'duration_seconds': end + RELEASE_SECONDS,
      'instruments': {
          stem: [{'part': part, 'program': prog, 'name': gm}
                 for part, (s, _, prog, gm, _) in PART_VOICES.items() if s == stem]
          for stem in ('vocal', 'accompaniment')},
      'lyrics': text.assembleLyrics(score.parts[0]) or '',
      'phrases': _phrases(soprano_notes, spq),
      'first_soprano_midi': int(soprano_notes[0].pitches[0].midi),
  }
  return {'events': events, 'meta': meta}


# ---------------------------------------------------------------- rendering

_sf2_bytes: bytes | None = None


def _soundfont() -> bytes:
  global _sf2_bytes
  if _sf2_bytes is None:
    with open(soundfont_path(), 'rb') as f:
      _sf2_bytes = f.read()
  return _sf2_bytes


# tinysoundfont declares pyaudio, which has no Linux wheel (and is needed only
# for live playback), so `pip install musicjax` cannot depend on it: it is
# installed without its dependencies (the Makefile does; docs/dependencies.md).
TINYSOUNDFONT_INSTALL = "pip install --no-deps 'tinysoundfont>=0.3.6'"


def _import_tinysoundfont():
  """The tinysoundfont module, or a UserError naming the command that installs it."""
  try:
    import tinysoundfont  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(
        'rendering the built-in chorale dataset (config.data.kind=chorales) '
        f'needs tinysoundfont, which is not installed ({e}). Install it with: '
        f'{TINYSOUNDFONT_INSTALL}   (--no-deps: its declared pyaudio dependency '
        'has no Linux wheel and is not used)') from e
  return tinysoundfont


def render_events(events: list[tuple[float, float, int, int, int]],
                  sample_rate: int, total_seconds: float) -> np.ndarray:
  """Renders (on, off, midi, channel, velocity) events to mono float32 [T]."""
  tinysoundfont = _import_tinysoundfont()
  synth = tinysoundfont.Synth(samplerate=sample_rate)
  sfid = synth.sfload(_soundfont())
  for _, chan, prog, _, _ in PART_VOICES.values():
    synth.program_select(chan, sfid, 0, prog)
  # (sample, is_on, midi, channel, velocity); offs sort before ons at a tie so
  # a repeated pitch re-attacks.
  timeline = []
  for on, off, midi, chan, vel in events:
    timeline.append((int(round(on * sample_rate)), 1, midi, chan, vel))
    timeline.append((int(round(off * sample_rate)), 0, midi, chan, vel))
  timeline.sort()
  total = int(round(total_seconds * sample_rate))
  out = np.zeros((total, 2), np.float32)
  pos = 0
  for sample, is_on, midi, chan, vel in timeline:
    sample = min(sample, total)
    if sample > pos:
      buf = synth.generate_simple(sample - pos)
      out[pos:sample] = np.frombuffer(buf, np.float32).reshape(-1, 2)
      pos = sample
    if is_on:
      synth.noteon(chan, midi, vel)
    else:
      synth.noteoff(chan, midi)
  if total > pos:
    buf = synth.generate_simple(total - pos)
    out[pos:] = np.frombuffer(buf, np.float32).reshape(-1, 2)
  return out.mean(axis=1)


def _render_piece(parsed: dict[str, Any], sample_rate: int) -> dict[str, np.ndarray]:
  total = parsed['meta']['duration_seconds']
  stems = {s: render_events(parsed['events'].get(s, []), sample_rate, total)
           for s in ('vocal', 'accompaniment')}
  stems['mix'] = stems['vocal'] + stems['accompaniment']
  peak = float(np.max(np.abs(stems['mix'])))
  scale = PEAK_LEVEL / peak if peak > 0 else 1.0
  return {k: v * scale for k, v in stems.items()}


def _atomic_write_json(path: str, obj: Any) -> None:
  fileio.write_text(path, json.dumps(obj, ensure_ascii=False, indent=1))


def _atomic_write_flac(path: str, x: np.ndarray, sample_rate: int) -> None:
  fileio.write_with(path, lambda tmp: sf.write(
      tmp, x, sample_rate, format='FLAC', subtype='PCM_16'))


def _entry(piece_dir: str) -> dict[str, Any] | None:
  """The manifest entry of a finished piece, None if skipped; KeyError if new."""
  meta_path = os.path.join(piece_dir, 'meta.json')
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    paths = {s: os.path.join(piece_dir, f'{s}.flac') for s in STEMS}
    return {'id': os.path.basename(piece_dir), 'bwv': meta['bwv'],
            'path': paths['mix'], 'stems': paths, 'meta': meta}
  if os.path.isfile(os.path.join(piece_dir, 'skip.json')):
    return None
  raise KeyError(piece_dir)


def ensure_piece(root: str, piece_id: str, corpus_name: str, sample_rate: int,
                 tempo_bpm: float) -> tuple[dict[str, Any] | None, bool]:
  """(entry or None if skipped, whether this call rendered it)."""
  piece_dir = os.path.join(root, piece_id)
  try:
    return _entry(piece_dir), False
  except KeyError:
    pass
  os.makedirs(piece_dir, exist_ok=True)
  with locks.locked(os.path.join(piece_dir, '.lock')):  # render each piece once
    try:  # another process may have finished it while we waited
      return _entry(piece_dir), False
    except KeyError:
      pass
    try:
      parsed = parse_piece(corpus_name, tempo_bpm)
    except ValueError as e:
      logger.info('musicjax: skipping chorale %s: %s', corpus_name, e)
      _atomic_write_json(os.path.join(piece_dir, 'skip.json'),
                         {'reason': str(e)})
      return None, True
    stems = _render_piece(parsed, sample_rate)
    meta = dict(parsed['meta'], sample_rate=sample_rate, id=piece_id,
                format_version=_FORMAT_VERSION)
    for s in STEMS:
      _atomic_write_flac(os.path.join(piece_dir, f'{s}.flac'), stems[s],
                         sample_rate)
    _atomic_write_json(os.path.join(piece_dir, 'meta.json'), meta)  # last: marks done
    return _entry(piece_dir), True


def chorale_manifest(config: ml_collections.ConfigDict,
                     split: str) -> list[dict[str, Any]]:
  """Rendered chorales of `split`, rendering missing ones into the cache.

  Each entry: {'id', 'bwv', 'path' (the mix), 'stems': {stem: path}, 'meta'}.
  Pieces are taken in the corpus's stable order, parsed lazily, so a small
  `data.max_pieces` parses only a few files.
  """
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  d = config.data
  if d.eval_every_nth_bwv < 1:
    raise ValueError('config.data.eval_every_nth_bwv must be >= 1, got '
                     f'{d.eval_every_nth_bwv}')
  limit = split_limits(config)[split]
  root = cache_root(config)
  os.makedirs(root, exist_ok=True)
  todo = [(pid, name) for pid, name in candidates()
          if split_of(bwv_of(pid), d.eval_every_nth_bwv) == split]
  entries: list[dict[str, Any]] = []
  bar = None
  try:
    for pid, name in todo:
      if limit is not None and len(entries) >= limit:
        break
      if bar is None and not _is_done(os.path.join(root, pid)):
        bar = tqdm(total=limit or len(todo), initial=len(entries), unit='piece',
                   desc=f'rendering chorales ({split}) into {root}')
      entry, _ = ensure_piece(root, pid, name, d.sample_rate, d.render_tempo_bpm)
      if entry is not None:
        entries.append(entry)
        if bar is not None:
          bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  return entries


def _is_done(piece_dir: str) -> bool:
  return (os.path.isfile(os.path.join(piece_dir, 'meta.json')) or
          os.path.isfile(os.path.join(piece_dir, 'skip.json')))


def stem_paths(config: ml_collections.ConfigDict, split: str) -> list[dict[str, str]]:
  """{stem: path} for every piece of `split` (vocal-to-accompaniment pairs)."""
  return [e['stems'] for e in chorale_manifest(config, split)]
