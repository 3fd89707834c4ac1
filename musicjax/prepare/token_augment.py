"""Augmented copies of songs for `musicjax prepare --codec-workdir`.

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

Stem statistics (--stems): meta['stem_stats'] holds each stem's RMS level over
the whole song (dBFS, `augment.rms`) and the share of codec frames (one hop
each) whose RMS is above `ACTIVE_THRESHOLD_DBFS` ('vocal_rms_db',
'accompaniment_rms_db', 'vocal_active', 'accompaniment_active'); training
pipelines use them to skip silent vocals and to filter for quality.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from musicjax import config as config_lib
from musicjax.data import augment
from musicjax.errors import UserError
from musicjax.prepare import token_items

# A codec frame counts as active (stem_stats) when its RMS is above this level:
# well over dither and reverb tails, well under any sung or played note.
ACTIVE_THRESHOLD_DBFS = -40.0
# Item 'variant' kinds: a tempo copy and a pitch copy of a train song.
TIME_STRETCH, PITCH_SHIFT = 'time_stretch', 'pitch_shift'


def augment_settings(config: ml_collections.ConfigDict,
                     stems: bool) -> dict[str, Any]:
  """The validated `config.data.augment`, as stored in the run settings.

  Raises:
    UserError: a value out of range, or eq_copies without --stems.
  """
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
    song_id = token_items.item_identity(item, config)[1]
    if augment.unit_hash(seed, song_id, 'speed_pitch') >= fraction:
      continue
    rng = augment.song_rng(seed, song_id, 'speed_pitch')
    rate = float(settings['stretch_rates'][rng.integers(len(settings['stretch_rates']))])
    steps = settings['pitch_steps'][rng.integers(len(settings['pitch_steps']))]
    out.append(_variant(item, TIME_STRETCH, rate, f'@x{rate:g}'))
    out.append(_variant(item, PITCH_SHIFT, steps, f'@{steps:+g}st'))
  return out


def transformed(waves: dict[str, np.ndarray], variant: dict[str, Any],
                 sample_rate: int, want_stems: bool) -> dict[str, np.ndarray]:
  """Every wave of a song through the variant's transform.

  With stems the mix is rebuilt as their sum: a phase vocoder does not
  commute with addition, and the mix must stay the sum of its stems.
  """
  fn = augment.time_stretch if variant['kind'] == TIME_STRETCH else augment.pitch_shift
  names = token_items.REQUIRED_STEMS if want_stems else tuple(waves)
  out = {s: fn(waves[s], sample_rate, variant['amount']) for s in names}
  if want_stems:
    out['mix'] = out['vocal'] + out['accompaniment']
  return out


def variant_meta(meta: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
  """The metadata of a tempo or pitch copy (timings or key follow)."""
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


def eq_codes(enc, accompaniment: np.ndarray, song_id: str,
              settings: dict[str, Any]) -> np.ndarray:
  """[N, F, K] codes of N frequency-balance copies of the accompaniment.

  `enc`: a `token_encode.Encoder`.
  """
  copies = []
  for i in range(settings['eq_copies']):
    rng = augment.song_rng(settings['seed'], song_id, 'eq', i)
    copies.append(enc.codes(augment.frequency_balance(
        accompaniment, enc.sample_rate, rng)))
  return np.stack(copies)
