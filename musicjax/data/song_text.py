"""Piece metadata -> the text conditions of the LM: tags, lyrics, sections.

Tags (HeartMuLa §3.2, table 6) are descriptors grouped by category. During
training each category is kept with its own probability (`sample_tags`), so
the model learns to follow any subset, influential categories (genre) most
often. A piece's tags come from its metadata's 'tags' key when it has one;
otherwise they are derived from what the chorale renderer records (key, meter,
instruments), see `derive_tags`.

Sections split a piece in time, each with a structure name ('verse'), its
lyrics and an optional style prompt. They tile the codec frames [0, num_frames)
exactly, gaps becoming 'instrumental' sections, because an LM layout
interleaves each section's text with that section's audio frames.

Lyrics text uses the markers of `musicjax.data.text.STRUCTURE_MARKERS`:
'[verse]\\nline\\n[chorus]\\nline'.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from musicjax.errors import UserError

TAG_CATEGORIES = ('genre', 'timbre', 'gender', 'mood', 'instrument', 'scene',
                  'region', 'topic')
# Probability of keeping each category in a training example (HeartMuLa table 6).
DEFAULT_TAG_PROBS: dict[str, float] = {
    'genre': 0.95, 'timbre': 0.5, 'gender': 0.375, 'mood': 0.325,
    'instrument': 0.25, 'scene': 0.2, 'region': 0.125, 'topic': 0.1,
}
# Categories beyond TAG_CATEGORIES (e.g. 'key', 'meter') are kept with this
# probability unless `probs` names them.
EXTRA_TAG_PROB = 0.5
# Tags given without a category ('pop, upbeat') go here; they are written
# without a 'category:' prefix and sort after every named category.
UNCATEGORIZED = 'other'

# Tags of every chorale of the built-in dataset (pieces whose meta has 'bwv').
CHORALE_TAGS: dict[str, list[str]] = {
    'genre': ['chorale', 'baroque', 'sacred'],
    'timbre': ['choir'],
    'scene': ['church'],
    'region': ['german'],
}
# Mood from the mode of meta['key'] ('D major' -> 'bright').
MODE_MOODS = {'major': 'bright', 'minor': 'solemn'}

# Section names.
DEFAULT_SECTION = 'verse'        # lyrics without a marker; chorale phrases
INSTRUMENTAL_SECTION = 'instrumental'  # gaps between sections; no lyrics

_CATEGORY_ITEM_RE = re.compile(r'^\s*([A-Za-z][\w -]*?)\s*:\s*(.*)$', re.DOTALL)
# A lyrics line that opens a section: '[Verse]', '[Verse 2]', '[Chorus: Ann]'.
_MARKER_LINE_RE = re.compile(r'^\s*\[([^\[\]\n]+)\]\s*(.*)$')
_LEADING_MARKER_RE = re.compile(r'\[([^\[\]\n]+)\]')


class BadSongMetadata(UserError, ValueError):
  """Metadata ('tags', 'sections') that cannot be turned into conditions."""


class BadTagProbs(UserError, ValueError):
  """A tag keep-probability outside [0, 1]."""


def _piece_name(meta: Mapping[str, Any]) -> str:
  for key in ('id', 'origin', 'title'):
    if meta.get(key):
      return str(meta[key])
  return '<unnamed piece>'


# --------------------------------------------------------------------- tags


def _clean_value(value: Any, meta: Mapping[str, Any]) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise BadSongMetadata(
        f'{_piece_name(meta)}: metadata key "tags" has the value {value!r}; '
        'tag values must be strings (or numbers)')
  return ' '.join(str(value).split()).lower()


def _add(tags: dict[str, list[str]], category: str, value: str) -> None:
  category = ' '.join(category.split()).lower() or UNCATEGORIZED
  if value and value not in tags.setdefault(category, []):
    tags[category].append(value)


def _parse_tag_string(text: str, meta: Mapping[str, Any]) -> dict[str, list[str]]:
  tags: dict[str, list[str]] = {}
  for group in text.split(';'):
    category = UNCATEGORIZED
    for item in group.split(','):
      m = _CATEGORY_ITEM_RE.match(item)
      if m:
        category, item = m.group(1), m.group(2)
      _add(tags, category, _clean_value(item, meta))
  return tags


def _parse_tags(raw: Any, meta: Mapping[str, Any]) -> dict[str, list[str]]:
  if isinstance(raw, str):
    return _parse_tag_string(raw, meta)
  if isinstance(raw, list):
    tags: dict[str, list[str]] = {}
    for v in raw:
      for category, values in _parse_tag_string(_clean_value(v, meta), meta).items():
        for value in values:
          _add(tags, category, value)
    return tags
  if isinstance(raw, dict):
    tags = {}
    for category, values in raw.items():
      values = values if isinstance(values, list) else [values]
      for v in values:
        for item in _clean_value(v, meta).split(','):
          _add(tags, str(category), item.strip())
    return tags
  raise BadSongMetadata(
      f'{_piece_name(meta)}: metadata key "tags" must be an object '
      '{"genre": ["pop"], ...}, a list of strings, or a string like '
      f'"genre: pop, rock; mood: happy", got {type(raw).__name__}')


def _instrument_names(instruments: Any) -> list[str]:
  groups = instruments.values() if isinstance(instruments, dict) else [instruments]
  names = []
  for group in groups:
    for inst in group if isinstance(group, list) else [group]:
      name = inst.get('name') if isinstance(inst, dict) else inst
      if isinstance(name, str) and name.strip():
        name = ' '.join(name.split()).lower()
        if name not in names:
          names.append(name)
  return names


def derive_tags(meta: Mapping[str, Any]) -> dict[str, list[str]]:
  """Tags of a piece: {category: [values]}, values lowercased and deduplicated.

  With meta['tags'] present, only those are used. It may be
    - an object {category: [values] or 'v1, v2'},
    - a string 'genre: pop, rock; mood: happy': ';' separates groups, ','
      separates values; 'category: value' starts a category, and a plain value
      belongs to the latest category of its group ('genre: pop, rock' is two
      genres), or to UNCATEGORIZED before any ('pop, rock'),
    - a list of such strings.
  Otherwise tags are derived from the chorale renderer's fields: CHORALE_TAGS
  for chorales (meta has 'bwv'), 'instrument' from meta['instruments'],
  'timbre' from the vocal instruments for non-chorales, 'mood' from the mode of
  meta['key'], and the extra categories 'key' ('d major') and 'meter' ('4/4').
  Categories with no value are left out.

  Raises:
    BadSongMetadata: if meta['tags'] has an unusable type.
  """
  raw = meta.get('tags')
  if raw:
    return _ordered(_parse_tags(raw, meta))
  tags: dict[str, list[str]] = {}
  is_chorale = bool(meta.get('bwv'))
  if is_chorale:
    for category, values in CHORALE_TAGS.items():
      tags[category] = list(values)
  instruments = meta.get('instruments')
  if instruments:
    if not is_chorale and isinstance(instruments, dict):
      tags['timbre'] = _instrument_names(instruments.get('vocal', []))
    tags['instrument'] = _instrument_names(instruments)
  key = meta.get('key')
  if isinstance(key, str) and key.strip():
    key = ' '.join(key.split()).lower()
    mood = MODE_MOODS.get(key.split()[-1])
    if mood:
      tags['mood'] = [mood]
    tags['key'] = [key]
  meter = meta.get('time_signature')
  if isinstance(meter, str) and meter.strip():
    tags['meter'] = [meter.strip()]
  return _ordered(tags)


def _category_order(tags: Mapping[str, Any]) -> list[str]:
  """TAG_CATEGORIES first, then extras alphabetically, UNCATEGORIZED last."""
  rank = {c: i for i, c in enumerate(TAG_CATEGORIES)}
  return sorted(tags, key=lambda c: (c == UNCATEGORIZED, rank.get(c, len(rank)), c))


def _ordered(tags: Mapping[str, list[str]]) -> dict[str, list[str]]:
  return {c: tags[c] for c in _category_order(tags) if tags[c]}


def sample_tags(tags: Mapping[str, list[str]], probs: Mapping[str, float],
                rng: np.random.Generator, *,
                extra_prob: float = EXTRA_TAG_PROB) -> dict[str, list[str]]:
  """Keeps each category independently with its probability.

  Args:
    tags: {category: [values]}, e.g. from `derive_tags`.
    probs: keep-probability per category (DEFAULT_TAG_PROBS: HeartMuLa's);
      categories not in it use `extra_prob`.
    rng: the random source; one uniform draw per category, in the order of
      `format_tags`, so the result depends only on the rng state and `tags`.
    extra_prob: keep-probability of categories missing from `probs`.

  Raises:
    BadTagProbs: if a probability used is outside [0, 1].
  """
  out = {}
  for category in _category_order(tags):
    p = probs.get(category, extra_prob)
    if not 0.0 <= p <= 1.0:
      raise BadTagProbs(f'tag keep-probability for {category!r} is {p}; it '
                        'must be in [0, 1]')
    if rng.random() < p and tags[category]:
      out[category] = list(tags[category])
  return out


def describe_tags(tags: Mapping[str, list[str]]) -> str:
  """'genre: chorale, baroque; mood: bright' (a description, as MusicGen's
  text encoder reads it); '' for no tags."""
  parts = []
  for category in _category_order(tags):
    if not tags[category]:
      continue
    values = ', '.join(tags[category])
    parts.append(values if category == UNCATEGORIZED else f'{category}: {values}')
  return '; '.join(parts)


def format_tags(tags: Mapping[str, list[str]]) -> str:
  """'<tag>genre: chorale, baroque; mood: bright</tag>'; '' for no tags."""
  text = describe_tags(tags)
  return f'<tag>{text}</tag>' if text else ''


# ----------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class Section:
  """A time span of a piece in codec frames [start_frame, end_frame)."""
  name: str
  start_frame: int
  end_frame: int
  lyrics: str = ''
  style: str = ''

  @property
  def marker(self) -> str:
    return f'[{self.name}]'

  @property
  def num_frames(self) -> int:
    return self.end_frame - self.start_frame


def normalize_section_name(name: str) -> str:
  """'[Verse 2]' -> 'verse', 'Pre Chorus' -> 'pre-chorus', 'Chorus: A' -> 'chorus'."""
  name = name.strip().strip('[]').split(':')[0]
  name = re.sub(r'\s*\d+$', '', name.strip().lower())
  return re.sub(r'\s+', '-', name) or DEFAULT_SECTION


def _text(value: Any, key: str, meta: Mapping[str, Any], index: int) -> str:
  if value is None:
    return ''
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return ', '.join(value)
  if not isinstance(value, str):
    raise BadSongMetadata(
        f'{_piece_name(meta)}: metadata "sections"[{index}].{key} must be a '
        f'string, got {type(value).__name__}')
  return value.strip()


def _seconds(entry: Mapping[str, Any], key: str, where: str,
             meta: Mapping[str, Any], index: int) -> float:
  value = entry.get(key)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise BadSongMetadata(
        f'{_piece_name(meta)}: metadata "{where}"[{index}] needs a number '
        f'"{key}" (seconds), got {value!r}')
  return float(value)


# (start seconds, end seconds, name, lyrics, style)
_Span = tuple[float, float, str, str, str]


def _timed_spans(meta: Mapping[str, Any]) -> list[_Span] | None:
  """Spans from meta['sections'] or meta['phrases'], sorted; None if neither."""
  if meta.get('sections'):
    where, entries = 'sections', meta['sections']
  elif meta.get('phrases'):
    where, entries = 'phrases', meta['phrases']
  else:
    return None
  if not isinstance(entries, list):
    raise BadSongMetadata(f'{_piece_name(meta)}: metadata "{where}" must be a '
                          f'list, got {type(entries).__name__}')
  spans = []
  for i, e in enumerate(entries):
    if not isinstance(e, dict):
      raise BadSongMetadata(f'{_piece_name(meta)}: metadata "{where}"[{i}] '
                            'must be an object {"start", "end", ...}')
    start = _seconds(e, 'start', where, meta, i)
    end = _seconds(e, 'end', where, meta, i)
    if end < start:
      raise BadSongMetadata(f'{_piece_name(meta)}: metadata "{where}"[{i}] '
                            f'ends ({end}s) before it starts ({start}s)')
    if where == 'sections':
      name = normalize_section_name(_text(e.get('name'), 'name', meta, i))
      lyrics = _text(e.get('lyrics'), 'lyrics', meta, i)
      style = _text(e.get('style'), 'style', meta, i)
    else:  # a chorale phrase is one line of a verse
      name, lyrics, style = DEFAULT_SECTION, _text(e.get('text'), 'text', meta, i), ''
    spans.append((start, end, name, lyrics, style))
  return sorted(spans, key=lambda s: (s[0], s[1]))


def _whole_piece(meta: Mapping[str, Any], num_frames: int) -> Section:
  lyrics = meta.get('lyrics')
  lyrics = lyrics.strip() if isinstance(lyrics, str) else ''
  if not lyrics:
    return Section(INSTRUMENTAL_SECTION, 0, num_frames)
  m = _LEADING_MARKER_RE.match(lyrics)
  if m:  # lyrics opening with their own marker: it names the section
    return Section(normalize_section_name(m.group(1)), 0, num_frames,
                   lyrics[m.end():].strip())
  return Section(DEFAULT_SECTION, 0, num_frames, lyrics)


def sections(meta: Mapping[str, Any], frame_rate: float, num_frames: int, *,
             offset_seconds: float = 0.0) -> list[Section]:
  """The sections of a piece, tiling the frames [0, num_frames) exactly.

  Taken from meta['sections'] ({name, start, end, lyrics, style}, seconds),
  else from the chorale meta['phrases'] ({start, end, text}; each phrase is a
  'verse' section: chorale phrases are the lines of one strophe), else one
  section over everything with meta['lyrics'] (named by the marker the lyrics
  open with, if any).

  Times become frames with round(t * frame_rate), clipped to [0, num_frames].
  Sections left empty by clipping are dropped. Gaps (including before the
  first and after the last section) become INSTRUMENTAL_SECTION sections.

  Args:
    meta: the piece's metadata.
    frame_rate: codec frames per second.
    num_frames: frames of the audio the sections describe.
    offset_seconds: time in the piece of frame 0 (for a crop of the piece).

  Raises:
    BadSongMetadata: on malformed or overlapping sections (overlaps below half
      a frame are rounding noise and allowed); the message names the piece.
  """
  if frame_rate <= 0:
    raise ValueError(f'frame_rate must be > 0, got {frame_rate}')
  if num_frames < 0:
    raise ValueError(f'num_frames must be >= 0, got {num_frames}')
  if num_frames == 0:
    return []
  spans = _timed_spans(meta)
  if spans is None:
    return [_whole_piece(meta, num_frames)]
  tolerance = 0.5 / frame_rate
  for (s0, e0, *_), (s1, e1, *_) in zip(spans, spans[1:]):
    if s1 < e0 - tolerance:
      raise BadSongMetadata(
          f'{_piece_name(meta)}: metadata sections overlap: [{s0}s, {e0}s] and '
          f'[{s1}s, {e1}s]; make each section end where (or before) the next '
          'starts')

  def frame(t: float) -> int:
    return min(max(round((t - offset_seconds) * frame_rate), 0), num_frames)

  out: list[Section] = []
  pos = 0
  for start, end, name, lyrics, style in spans:
    a, b = max(frame(start), pos), frame(end)
    if b <= a:
      continue
    if a > pos:
      out.append(Section(INSTRUMENTAL_SECTION, pos, a))
    out.append(Section(name, a, b, lyrics, style))
    pos = b
  if pos < num_frames:
    out.append(Section(INSTRUMENTAL_SECTION, pos, num_frames))
  return out


def format_section(section: Section) -> str:
  """One section's text: '[verse] <style>soft</style> Valet will ich ...'."""
  parts = [section.marker]
  if section.style:
    parts.append(f'<style>{section.style}</style>')
  if section.lyrics:
    parts.append(section.lyrics)
  return ' '.join(parts)


def format_lyrics(secs: list[Section]) -> str:
  """All lyrics: '[verse]\\nValet will ich dir geben,\\n[verse]\\n...'."""
  lines = []
  for s in secs:
    lines.append(s.marker)
    if s.lyrics:
      lines.append(s.lyrics)
  return '\n'.join(lines)


def parse_lyrics_file(text: str) -> list[tuple[str, str]]:
  """User lyrics -> [(marker, text)], e.g. [('[verse]', 'line 1\\nline 2')].

  A line that starts with a bracketed marker ('[Chorus]', '[Verse 2]') opens a
  section; the marker is normalised ('[verse]') and text after it on the same
  line belongs to the section. Text before any marker goes into a '[verse]'.
  Blank lines are dropped. An empty file gives [] (generate without lyrics).
  """
  out: list[tuple[str, list[str]]] = []
  for line in text.splitlines():
    m = _MARKER_LINE_RE.match(line)
    if m:
      out.append((f'[{normalize_section_name(m.group(1))}]', []))
      line = m.group(2)
    if not line.strip():
      continue
    if not out:
      out.append((f'[{DEFAULT_SECTION}]', []))
    out[-1][1].append(line.strip())
  return [(marker, '\n'.join(lines)) for marker, lines in out]
