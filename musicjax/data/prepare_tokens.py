"""`musicjax prepare --codec-workdir`: a dataset encoded to codec tokens, for the LM.

The codec runs once here instead of in every LM training step. Every song is
encoded whole (in fixed-size chunks, `codec.chunked.encode_array`) at the
codec's sample rate and channels; the records are described in
`token_records`.

Work split: with P processes, item i of a split goes to process i % P. Each
process writes its own shards; its j-th item goes to shard j //
`config.data.records_per_shard`. A shard is written under a hidden temporary
name and renamed when complete, after its sidecar (<shard>.json: record count,
bad files, run settings). A rerun with the same --out therefore resumes: a
shard whose final file exists is skipped, everything else is (re)encoded, and
the result is the same as an uninterrupted run. Shards written with other
settings (another codec or checkpoint, other data, process count or shard
size) are an error, not silently mixed in.

Resume is per song, not per shard: while a shard is being written, each
finished item is kept as its own file in the hidden folder `.<shard>.parts/`
(`song_parts`). A rerun takes every item
found there as done and encodes only the rest; the shard is then assembled
from the parts in item order, so a killed run loses at most the song it was
encoding, and the dataset is byte for byte the one an uninterrupted run
writes. The folder is removed once its shard is final.

Stems (`--stems`): records also get the codes of the vocal and accompaniment
stems. Chorales have them. A folder dataset (`data.kind=folder`) uses this
convention, one sub-folder per song:

  <data.path>/<song>/vocals.<ext>         the melody stem    (required)
  <data.path>/<song>/accompaniment.<ext>  everything else    (required)
  <data.path>/<song>/mix.<ext>            the full song      (optional; else
                                          vocals + accompaniment, summed)
  <data.path>/<song>/meta.json or <data.path>/<song>.json   metadata (optional)

with <ext> any of `audio.AUDIO_EXTENSIONS`. The split hashes the song folder's
path like `sources.folder_split` hashes file paths. A song with a missing or
duplicated stem, or stems whose lengths differ by more than
`STEM_LENGTH_TOLERANCE_FRAMES` codec frames, is reported and skipped; stems
within the tolerance are cut to the shortest.

Melody: chroma classes of the vocal stem whenever the source has one (chorales
always do, with or without --stems), else of the mix.

Stem statistics (--stems): meta['stem_stats'] holds each stem's RMS level over
the whole song (dBFS, `augment.rms`) and the share of codec frames (one hop
each) whose RMS is above `ACTIVE_THRESHOLD_DBFS` ('vocal_rms_db',
'accompaniment_rms_db', 'vocal_active', 'accompaniment_active'); training
pipelines use them to skip silent vocals and to filter for quality.

Augmentation (`config.data.augment`, `musicjax.data.augment`), decided per
song from (`data.shuffle_seed`, song id) so a rerun makes the same copies:
  * eq_copies N (--stems only): the record also holds the codes of N
    frequency-balance copies of the accompaniment, accompaniment_eq_codes
    [N, F, K]; copy i's filters are drawn from (seed, song id, i).
  * speed_pitch_fraction p: in the train split, a share p of the songs (by a
    hash of the id) gets two extra items, a tempo copy (rate from
    stretch_rates, id '<id>@x1.1') and a pitch copy (semitones from
    pitch_steps, id '<id>@+2st'). Every stem is transformed the same way;
    with --stems the mix is the sum of the transformed stems (otherwise the
    mix is transformed), the melody is recomputed, and the metadata follows
    (`augment.stretch_meta`: timings / rate; `augment.shift_meta`: the key).
The augment settings are part of the run settings: changing them on an
existing --out is an error like any other setting.

Bad items (unreadable audio, bad stems, metadata the LM cannot turn into text,
see `song_text.BadSongMetadata`) are reported with `audio.report_bad`, listed
in the shard's sidecar and in dataset.json, and skipped.

At the end process 0 trains DIR/tokenizer.json on the train records' texts
(unless it exists) and writes DIR/dataset.json, which marks a finished run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from musicjax import fileio
from musicjax.data import audio
from musicjax.data import augment
from musicjax.data import song_parts
from musicjax.data import sources
from musicjax.data import token_records
from musicjax.errors import UserError
from musicjax.train import runs

logger = logging.getLogger('musicjax.data')

# Songs are encoded in windows of this many seconds (+ context on each side),
# so memory stays flat however long a song is.
DEFAULT_CHUNK_SECONDS = 10.0
DEFAULT_CONTEXT_SECONDS = 1.0
# Stems may differ in length by this many codec frames (encoder padding, a
# resampler's edge); beyond it they are not the same song.
STEM_LENGTH_TOLERANCE_FRAMES = 2
# Folder convention: stem -> file name (without extension) in a song folder.
STEM_FILES = {'vocal': 'vocals', 'accompaniment': 'accompaniment', 'mix': 'mix'}
REQUIRED_STEMS = ('vocal', 'accompaniment')
SONG_META_FILE = 'meta.json'
# A codec frame counts as active (stem_stats) when its RMS is above this level:
# well over dither and reverb tails, well under any sung or played note.
ACTIVE_THRESHOLD_DBFS = -40.0
# Item 'variant' kinds: a tempo copy and a pitch copy of a train song.
TIME_STRETCH, PITCH_SHIFT = 'time_stretch', 'pitch_shift'
_TMP_PREFIX = '.'
_TMP_SUFFIX = '.tmp'
# Finished items of a shard in progress (module docstring: resume per song).
_PARTS_SUFFIX = '.parts'


# ----------------------------------------------------------------- the codec


class _Encoder:
  """Audio -> codes and melody at the codec's rate."""

  def __init__(self, model, sample_rate: int, channels: int, chunk_seconds: float,
               context_seconds: float, batch: int):
    self.model = model
    self.sample_rate, self.channels = sample_rate, channels
    self.hop = int(model.hop_length)
    self._chunking = dict(chunk_seconds=chunk_seconds,
                          context_seconds=context_seconds, batch=batch)

  def codes(self, wave: np.ndarray) -> np.ndarray:
    """[T, C] -> [ceil(T / hop), K] (`chunked.encode_array`)."""
    from musicjax.codec import chunked  # pylint: disable=g-import-not-at-top
    return chunked.encode_array(self.model, wave, **self._chunking,
                                progress=False)  # per-song bar above

  def melody(self, wave: np.ndarray) -> np.ndarray:
    from musicjax.data import melody  # pylint: disable=g-import-not-at-top
    return np.asarray(melody.chroma_tokens(wave, self.sample_rate, self.hop))


# ----------------------------------------------------------------- the items


def _find_stem_songs(root: str) -> dict[str, dict[str, list[str]]]:
  """{song folder: {stem: [files]}} for every folder holding a stem file."""
  by_name = {v: k for k, v in STEM_FILES.items()}
  songs: dict[str, dict[str, list[str]]] = {}
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for fn in sorted(filenames):
      base, ext = os.path.splitext(fn)
      if ext.lower() in audio.AUDIO_EXTENSIONS and base.lower() in by_name:
        stems = songs.setdefault(dirpath, {})
        stems.setdefault(by_name[base.lower()], []).append(os.path.join(dirpath, fn))
  return songs


def _song_meta(song_dir: str) -> dict[str, Any]:
  """<song>/meta.json, else <song>.json next to the folder, else {}."""
  inside = os.path.join(song_dir, SONG_META_FILE)
  # sidecar_metadata(p) reads p + '.json': here <song>/meta.json.
  meta = sources.sidecar_metadata(os.path.splitext(inside)[0])
  return meta or sources.sidecar_metadata(song_dir)


def stem_folder_items(config: ml_collections.ConfigDict,
                      split: str) -> list[dict[str, Any]]:
  """Items of a folder of song sub-folders with stems (see the module docstring).

  Each item: {'name': song folder, 'source': mix path or None,
  'stems': {'vocal', 'accompaniment'[, 'mix']: path}, 'meta'}.
  """
  root = os.path.expanduser(config.data.path)
  where = f'config.data.path={config.data.path!r}'
  if not config.data.path or not os.path.isdir(root):
    raise sources.NoUsableAudio(f'{where} is not a directory (--stems with '
                                'data.kind=folder needs a folder of song folders)')
  songs = _find_stem_songs(root)
  dirs = sorted(songs, key=lambda d: os.path.relpath(d, root))
  exts = '|'.join(e.lstrip('.') for e in audio.AUDIO_EXTENSIONS)
  usable = []
  for song in dirs:  # every split's bad songs are named, then the rest split
    found = songs[song]
    missing = [f'{STEM_FILES[s]}.<{exts}>' for s in REQUIRED_STEMS if s not in found]
    doubled = [os.path.basename(p) for s in found.values() if len(s) > 1 for p in s]
    if missing or doubled:
      reason = (f'missing stem {", ".join(missing)}' if missing else
                f'more than one file for a stem: {", ".join(doubled)}')
      audio.report_bad(song, reason)
      continue
    usable.append(song)
  chosen = sources.folder_split(usable, root, config.data.eval_fraction)[split]
  items = []
  for song in chosen:
    stems = {s: paths[0] for s, paths in songs[song].items()}
    items.append({'name': song, 'source': stems.get('mix'), 'stems': stems,
                  'meta': _song_meta(song)})
  if not items:
    raise sources.NoUsableAudio(
        f'no usable song folder for split {split!r} in {where}: --stems with '
        f'data.kind=folder needs sub-folders with {STEM_FILES["vocal"]}.<ext> and '
        f'{STEM_FILES["accompaniment"]}.<ext> ({len(dirs)} song folder(s), '
        f'{len(usable)} usable, the rest named above; each split needs one)')
  return items


def split_items(config: ml_collections.ConfigDict, split: str,
                stems: bool) -> list[dict[str, Any]]:
  """The items of `split` to encode; chorales always carry their stems."""
  kind = config.data.kind
  if stems and kind == 'folder':
    return stem_folder_items(config, split)
  if stems and kind != 'chorales':
    raise UserError(f'--stems needs config.data.kind chorales or folder (song '
                    f'folders with vocals/accompaniment files), got {kind!r}; '
                    'drop --stems or convert the data')
  items = sources.items(config, split)
  if kind == 'chorales':
    from musicjax.data import chorales  # pylint: disable=g-import-not-at-top
    by_mix = {e['path']: e['stems'] for e in chorales.chorale_manifest(config, split)}
    items = [dict(it, stems=by_mix[it['source']]) for it in items]
  return items


# -------------------------------------------------------------- augmentation


def augment_settings(config: ml_collections.ConfigDict,
                     stems: bool) -> dict[str, Any]:
  """The validated `config.data.augment`, as stored in the run settings.

  Raises:
    UserError: a value out of range, or eq_copies without --stems.
  """
  from musicjax import config as config_lib  # pylint: disable=g-import-not-at-top
  a = config.data.get('augment') or config_lib.base_config().data.augment
  key = 'config.data.augment'
  eq, fraction = int(a.eq_copies), float(a.speed_pitch_fraction)
  rates = [float(r) for r in a.stretch_rates]
  steps = list(a.pitch_steps)
  if eq < 0:
    raise UserError(f'{key}.eq_copies must be >= 0, got {eq}')
  if eq and not stems:
    raise UserError(f'{key}.eq_copies={eq} needs --stems (the copies are of the '
                    'accompaniment stem); pass --stems or set '
                    f'--{key}.eq_copies=0')
  if not 0.0 <= fraction <= 1.0:
    raise UserError(f'{key}.speed_pitch_fraction must be in [0, 1], got {fraction}')
  if fraction and (not rates or not steps):
    raise UserError(f'{key}.speed_pitch_fraction={fraction} needs non-empty '
                    f'{key}.stretch_rates and {key}.pitch_steps')
  if any(r <= 0 for r in rates):
    raise UserError(f'{key}.stretch_rates must all be > 0, got {tuple(rates)}')
  active = bool(eq or fraction)
  # The seed only matters (and only pins the run) when something is drawn.
  seed = int(config.data.shuffle_seed) if active else None
  return {'eq_copies': eq, 'stretch_rates': rates, 'pitch_steps': steps,
          'speed_pitch_fraction': fraction, 'seed': seed}


def _variant(item: dict[str, Any], kind: str, amount: float,
             suffix: str) -> dict[str, Any]:
  base = item.get('variant', {}).get('of', item['name'])
  return dict(item, name=base + suffix,
              variant={'kind': kind, 'amount': amount, 'suffix': suffix,
                       'of': base})


def speed_pitch_variants(items: list[dict[str, Any]],
                         config: ml_collections.ConfigDict,
                         settings: dict[str, Any]) -> list[dict[str, Any]]:
  """`items` with a tempo and a pitch copy after each chosen song.

  A song is chosen when `augment.unit_hash(seed, id, ...)` < the fraction;
  its rate and semitones are drawn from (seed, id).
  """
  fraction, seed = settings['speed_pitch_fraction'], settings['seed']
  if not fraction:
    return items
  out = []
  for item in items:
    out.append(item)
    song_id = item_identity(item, config)[1]
    if augment.unit_hash(seed, song_id, 'speed_pitch') >= fraction:
      continue
    rng = augment.song_rng(seed, song_id, 'speed_pitch')
    rate = float(settings['stretch_rates'][rng.integers(len(settings['stretch_rates']))])
    steps = settings['pitch_steps'][rng.integers(len(settings['pitch_steps']))]
    out.append(_variant(item, TIME_STRETCH, rate, f'@x{rate:g}'))
    out.append(_variant(item, PITCH_SHIFT, steps, f'@{steps:+g}st'))
  return out


def _transformed(waves: dict[str, np.ndarray], variant: dict[str, Any],
                 sample_rate: int, want_stems: bool) -> dict[str, np.ndarray]:
  """Every wave of a song through the variant's transform.

  With stems the mix is rebuilt as their sum: a phase vocoder does not
  commute with addition, and the mix must stay the sum of its stems.
  """
  fn = augment.time_stretch if variant['kind'] == TIME_STRETCH else augment.pitch_shift
  names = REQUIRED_STEMS if want_stems else tuple(waves)
  out = {s: fn(waves[s], sample_rate, variant['amount']) for s in names}
  if want_stems:
    out['mix'] = out['vocal'] + out['accompaniment']
  return out


def _variant_meta(meta: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
  if variant['kind'] == TIME_STRETCH:
    return augment.stretch_meta(meta, variant['amount'])
  return augment.shift_meta(meta, variant['amount'])


def stem_stats(vocal: np.ndarray, accompaniment: np.ndarray,
               hop: int) -> dict[str, float]:
  """meta['stem_stats'] of a song (see the module docstring)."""
  stats = {}
  for name, wave in (('vocal', vocal), ('accompaniment', accompaniment)):
    stats[f'{name}_rms_db'] = augment.to_dbfs(augment.rms(wave))
    stats[f'{name}_active'] = augment.active_fraction(wave, hop,
                                                      ACTIVE_THRESHOLD_DBFS)
  return stats


def _eq_codes(enc: _Encoder, accompaniment: np.ndarray, song_id: str,
              settings: dict[str, Any]) -> np.ndarray:
  """[N, F, K] codes of N frequency-balance copies of the accompaniment."""
  copies = []
  for i in range(settings['eq_copies']):
    rng = augment.song_rng(settings['seed'], song_id, 'eq', i)
    copies.append(enc.codes(augment.frequency_balance(
        accompaniment, enc.sample_rate, rng)))
  return np.stack(copies)


# ------------------------------------------------------------------ encoding


def _load_waves(item: dict[str, Any], enc: _Encoder, want_stems: bool,
                max_seconds: float) -> dict[str, np.ndarray]:
  """{'mix'[, 'vocal'][, 'accompaniment']}: [T, C] at the codec rate, equal T.

  Raises:
    audio.BadAudio: an unreadable stem, or stems of different lengths.
  """
  def load(source, name):
    return audio.load_audio(source, enc.sample_rate, enc.channels, max_seconds,
                            name=name)

  stems = item.get('stems') or {}
  wanted = (REQUIRED_STEMS if want_stems else ('vocal',)) if stems else ()
  waves = {s: load(stems[s], stems[s]) for s in wanted}
  source = item['source']
  if source is not None:
    waves['mix'] = load(source, source if isinstance(source, str) else item['name'])
  lengths = {s: w.shape[0] for s, w in waves.items()}
  tolerance = STEM_LENGTH_TOLERANCE_FRAMES * enc.hop
  if max(lengths.values()) - min(lengths.values()) > tolerance:
    raise audio.BadAudio(item['name'], (
        'stem lengths differ by more than '
        f'{STEM_LENGTH_TOLERANCE_FRAMES} codec frames ({tolerance} samples at '
        f'{enc.sample_rate} Hz): ' +
        ', '.join(f'{s} {n}' for s, n in sorted(lengths.items()))))
  shortest = min(lengths.values())
  waves = {s: w[:shortest] for s, w in waves.items()}
  if 'mix' not in waves:
    waves['mix'] = waves['vocal'] + waves['accompaniment']
  return waves


def _default_id(path: str, root: str | None) -> str:
  """A stable id: the path relative to the data folder, without extension."""
  if root and os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
    path = os.path.relpath(path, root)
  else:
    path = os.path.basename(path.rstrip(os.sep))
  base, ext = os.path.splitext(path)
  return base if ext.lower() in audio.AUDIO_EXTENSIONS else path


def _check_text_metadata(item: dict[str, Any], num_frames: int,
                         frame_rate: float) -> None:
  """Raises BadAudio if the LM could not turn the item's metadata into text."""
  from musicjax.data import song_text  # pylint: disable=g-import-not-at-top
  from musicjax.data import text  # pylint: disable=g-import-not-at-top
  try:
    text.piece_texts(item['meta'])
    song_text.sections(item['meta'], frame_rate, num_frames)
  except song_text.BadSongMetadata as e:
    raise audio.BadAudio(item['name'], f'unusable metadata ({e})') from None


def item_identity(item: dict[str, Any],
                  config: ml_collections.ConfigDict) -> tuple[str | None, str]:
  """(origin, id) a record of `item` gets; a variant's id has its suffix.

  origin: the source path (None for items read from records), unless the
  metadata names one; id: meta['id'], else the path relative to the data
  folder without extension (`_default_id`).
  """
  variant = item.get('variant') or {}
  name = variant.get('of', item['name'])
  origin = name if isinstance(item['source'], (str, type(None))) else None
  origin = item['meta'].get('origin', origin)
  root = config.data.path if config.data.kind == 'folder' else None
  base = str(item['meta'].get('id') or _default_id(origin or name, root))
  return origin, base + variant.get('suffix', '')


def encode_item(item: dict[str, Any], enc: _Encoder, config: ml_collections.ConfigDict,
                want_stems: bool, codebook_size: int) -> bytes:
  """One item (or a tempo / pitch variant of one) as record bytes.

  Raises:
    audio.BadAudio: the item cannot be used (named by path, with the reason).
  """
  if 'error' in item:  # a damaged input record (data.kind=array_record)
    raise audio.BadAudio(item['name'], item['error'])
  settings = augment_settings(config, want_stems)
  origin, song_id = item_identity(item, config)
  waves = _load_waves(item, enc, want_stems, config.data.max_file_seconds)
  if item.get('variant'):
    waves = _transformed(waves, item['variant'], enc.sample_rate, want_stems)
    item = dict(item, meta=_variant_meta(item['meta'], item['variant']))
  _check_text_metadata(item, math.ceil(waves['mix'].shape[0] / enc.hop),
                       float(enc.model.frame_rate))
  codes = enc.codes(waves['mix'])
  melody = enc.melody(waves.get('vocal', waves['mix']))
  if melody.shape != (codes.shape[0],):
    raise RuntimeError(f'melody.chroma_tokens gave {melody.shape[0]} frames for '
                       f'{codes.shape[0]} codec frames (hop {enc.hop})')
  meta = dict(item['meta'])
  stem_codes = None
  if want_stems:
    stem_codes = {'vocal_codes': enc.codes(waves['vocal']),
                  'accompaniment_codes': enc.codes(waves['accompaniment'])}
    if settings['eq_copies']:
      stem_codes[token_records.ACCOMPANIMENT_EQ_KEY] = _eq_codes(
          enc, waves['accompaniment'], song_id, settings)
    meta['stem_stats'] = stem_stats(waves['vocal'], waves['accompaniment'],
                                    enc.hop)
  meta['origin'], meta['id'] = origin, song_id
  if item.get('stems'):
    meta['stem_origins'] = dict(item['stems'])
  meta.update(num_frames=int(codes.shape[0]), frame_rate=float(enc.model.frame_rate),
              sample_rate=enc.sample_rate)
  return token_records.encode_record(codes, melody, meta, codebook_size, stem_codes)


# -------------------------------------------------------------------- shards


def _atomic_write_json(path: str, obj: Any) -> None:
  fileio.write_text(path, json.dumps(obj, ensure_ascii=False, indent=1,
                                     sort_keys=True),
                    prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)


def _read_sidecar(shard_path: str) -> dict[str, Any] | None:
  try:
    with open(shard_path + token_records.SIDECAR_SUFFIX, encoding='utf-8') as f:
      side = json.load(f)
  except (OSError, ValueError):
    return None
  return side if isinstance(side, dict) else None


def _parts_dir(path: str) -> str:
  directory, name = os.path.split(path)
  return os.path.join(directory, _TMP_PREFIX + name + _PARTS_SUFFIX)


def _write_shard(path: str, items: list[dict[str, Any]], encode, bar,
                 settings: dict[str, Any]) -> dict[str, Any]:
  """Encodes `items` into `path` via a temporary file; returns the sidecar.

  Items already in the shard's parts folder (an interrupted earlier run) are
  taken from there; each newly encoded one is saved there before the next
  starts (`song_parts`).
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  parts = song_parts.SongParts(_parts_dir(path), settings, path)
  parts.make(items, encode, bar)
  records, bad = parts.finished(len(items))
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, _TMP_PREFIX + name + _TMP_SUFFIX)
  writer = array_record_module.ArrayRecordWriter(tmp, token_records.WRITER_OPTIONS)
  try:
    for raw in records:
      writer.write(raw)
  finally:
    writer.close()
  return {'tmp': tmp, 'records': len(records), 'bad_files': bad, 'parts': parts}


def _prepare_split(split: str, items: list[dict[str, Any]], out_dir: str,
                   settings: dict[str, Any], encode) -> None:
  """Writes (or resumes) this process's shards of `split`.

  `settings` are those of the split (`_split_settings`).
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  process, count = jax.process_index(), jax.process_count()
  per_shard = settings['records_per_shard']
  mine = items[process::count]
  with tqdm(total=len(mine), desc=f'prepare tokens {split}', unit='song') as bar:
    for shard in range(math.ceil(len(mine) / per_shard)):
      chunk = mine[shard * per_shard:(shard + 1) * per_shard]
      path = os.path.join(out_dir, token_records.shard_name(split, process, shard))
      side = _read_sidecar(path) if os.path.isfile(path) else None
      if side is not None:  # finished in an earlier run
        song_parts.settings_differ(path, side.get('settings', {}), settings)
        shutil.rmtree(_parts_dir(path), ignore_errors=True)  # killed after the rename
        bar.update(len(chunk))
        continue
      done = _write_shard(path, chunk, encode, bar, settings)
      tmp, parts = done.pop('tmp'), done.pop('parts')
      _atomic_write_json(path + token_records.SIDECAR_SUFFIX,
                         dict(done, settings=settings))
      os.replace(tmp, path)  # the final name marks the shard done
      parts.remove()


def _split_settings(settings: dict[str, Any], split: str,
                    items: list[dict[str, Any]]) -> dict[str, Any]:
  return dict(settings, split=split, items=song_parts.items_fingerprint([it['name'] for it in items]))


def _summarise(out_dir: str,
               split_settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Record counts and bad files over every process's shards."""
  counts, bad = {}, {}
  for split, settings in split_settings.items():
    counts[split] = 0
    for path in token_records.shard_paths(out_dir, split):
      side = _read_sidecar(path)
      if side is None:
        raise UserError(f'{path} has no readable sidecar {os.path.basename(path)}'
                        f'{token_records.SIDECAR_SUFFIX}; delete the shard and rerun '
                        'the same `musicjax prepare` to re-encode it')
      song_parts.settings_differ(path, side.get('settings', {}), settings)
      counts[split] += int(side['records'])
      bad.update(side.get('bad_files', {}))
  return {'splits': counts, 'bad_files': bad}


# --------------------------------------------------------------------- text


def _train_tokenizer(out_dir: str, config: ml_collections.ConfigDict) -> str:
  """DIR/tokenizer.json from the train records' texts, unless it exists."""
  from musicjax.data import text  # pylint: disable=g-import-not-at-top
  path = os.path.join(out_dir, text.TOKENIZER_FILENAME)
  if os.path.isfile(path):
    return path
  vocab_size = int(config.data.get('text_vocab_size', text.DEFAULT_VOCAB_SIZE))
  texts = []
  ds = token_records.source(out_dir, 'train')
  for i in range(len(ds)):
    record = ds[i]
    if 'error' not in record:
      texts.extend(text.piece_texts(record['meta']))
  if not texts:
    logger.warning('musicjax: the train records in %s have no tags or lyrics; '
                   'the text tokenizer will have only byte tokens', out_dir)
  text.TextTokenizer.train(texts, vocab_size, path)
  return path


# ---------------------------------------------------------------------- main


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def prepare_tokens_main(codec_workdir: str, out_dir: str,
                        config: ml_collections.ConfigDict | None = None,
                        stems: bool = False,
                        chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
                        context_seconds: float = DEFAULT_CONTEXT_SECONDS,
                        batch: int | None = None) -> dict[str, Any]:
  """Encodes a dataset with a trained codec into token shards under `out_dir`.

  Args:
    codec_workdir: a codec training workdir (config.json + checkpoints).
    out_dir: the output directory; rerunning with the same one resumes.
    config: which data to encode (`config.data`) and how to augment it
      (`config.data.augment`, module docstring); None: the codec's own.
    stems: also store vocal/accompaniment codes (chorales, or folder with the
      song-folder convention of the module docstring).
    chunk_seconds: encoder window length (see `codec.chunked`).
    context_seconds: context on each side of a window.
    batch: windows per encoder call (None: the local device count).

  Returns:
    {'train': records, 'eval': records, 'bad_files': count, 'seconds': wall}.
  """
  start = time.perf_counter()
  codec = runs.load_run(codec_workdir, expect='codec', verb='prepare',
                        flag='--codec-workdir')
  codec_config, model, step = codec.config, codec.model, codec.step
  config = codec_config if config is None else config
  enc = _Encoder(model, int(codec_config.data.sample_rate),
                 int(codec_config.data.channels), chunk_seconds, context_seconds,
                 batch or jax.local_device_count())
  os.makedirs(out_dir, exist_ok=True)
  settings = {'format': token_records.FORMAT,
              'codec_workdir': os.path.abspath(codec_workdir), 'codec_step': step,
              'data': sources.describe(config), 'stems': bool(stems),
              'records_per_shard': int(config.data.records_per_shard),
              'process_count': jax.process_count(),
              'augment': augment_settings(config, stems)}
  if settings['records_per_shard'] < 1:
    raise UserError('config.data.records_per_shard must be >= 1, got '
                    f'{settings["records_per_shard"]}')

  def encode(item):
    return encode_item(item, enc, config, stems, model.codebook_size)

  split_settings = {}
  for split in sources.SPLITS:
    items = split_items(config, split, stems)
    if split == 'train':  # evaluation sees the songs as they are
      items = speed_pitch_variants(items, config, settings['augment'])
    split_settings[split] = _split_settings(settings, split, items)
    _prepare_split(split, items, out_dir, split_settings[split], encode)
  _barrier('musicjax prepare tokens: shards written')
  summary = _summarise(out_dir, split_settings)
  summary['bad_files'] = dict(sorted({**audio.bad_files(),
                                      **summary['bad_files']}.items()))
  if jax.process_index() == 0:
    tokenizer = _train_tokenizer(out_dir, config)
    info = {'format': token_records.FORMAT,
            'codec_workdir': os.path.abspath(codec_workdir), 'codec_step': step,
            'num_codebooks': int(model.num_codebooks),
            'codebook_size': int(model.codebook_size),
            'frame_rate': float(model.frame_rate), 'hop_length': enc.hop,
            'sample_rate': enc.sample_rate, 'channels': enc.channels,
            'stems': bool(stems), 'data': settings['data'],
            'augment': settings['augment'],
            'tokenizer': os.path.basename(tokenizer), **summary}
    _atomic_write_json(os.path.join(out_dir, token_records.DATASET_INFO), info)
  _barrier('musicjax prepare tokens: dataset.json written')
  out = dict(summary['splits'], bad_files=len(summary['bad_files']),
             seconds=time.perf_counter() - start)
  logger.info('musicjax: token dataset %s: %s', out_dir, out)
  return out
