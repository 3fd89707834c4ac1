"""A TFDS builder for the rendered chorales (`data.kind = 'tfds'`).

It reads the chorale cache (rendering what is missing) and writes ArrayRecord
files with plain tensor/text features only: `tfds.features.Audio` imports
TensorFlow, which this project does not install. Read it back with

    tfds.data_source('musicjax_chorales', data_dir=tfds_data_dir(config))

whose splits 'train' and 'eval' are random-access sources for Grain. Each
example: 'id' (text), 'vocal' / 'accompaniment' / 'mix' (int16 [T], mono, as
in the cache's 16-bit FLAC), 'sample_rate' (int32), 'meta' (JSON text).

`config.data.path` is the TFDS data_dir; empty means
`<cache_dir>/tfds/chorales-<sr>hz-<tempo>bpm-<max_pieces>`, so each rendering
variant gets its own directory.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import ml_collections
import numpy as np
import soundfile as sf
import tensorflow_datasets as tfds

from musicjax.data import chorales
from musicjax.data import locks

NAME = 'musicjax_chorales'


class MusicjaxChorales(tfds.core.GeneratorBasedBuilder):
  """Bach chorales from music21, rendered to vocal/accompaniment/mix stems."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, musicjax_config: ml_collections.ConfigDict | None = None,
               **kwargs):
    # Reading needs no config; building renders with the config's settings.
    self._musicjax_config = musicjax_config
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    stem = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int16)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'vocal': stem(),
            'accompaniment': stem(),
            'mix': stem(),
            'sample_rate': tfds.features.Scalar(dtype=np.int32),
            'meta': tfds.features.Text(),
        }),
        homepage='https://web.mit.edu/music21/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local: the music21 corpus and a soundfont
    if self._musicjax_config is None:
      raise ValueError(f'building {NAME} needs musicjax_config= (the data.* '
                       'settings to render with)')
    return {s: self._generate_examples(
        chorales.chorale_manifest(self._musicjax_config, s))
            for s in ('train', 'eval')}

  def _generate_examples(self, manifest: list[dict[str, Any]]):
    for entry in manifest:
      example = {'id': entry['id'], 'meta': json.dumps(entry['meta'],
                                                       ensure_ascii=False)}
      for s, path in entry['stems'].items():
        x, sr = sf.read(path, dtype='int16', always_2d=True)
        example[s] = x[:, 0]
        example['sample_rate'] = sr
      yield entry['id'], example


def tfds_data_dir(config: ml_collections.ConfigDict) -> str:
  if config.data.path:
    return os.path.expanduser(config.data.path)
  d = config.data
  return os.path.join(os.path.expanduser(d.cache_dir), 'tfds',
                      f'chorales-{d.sample_rate}hz-{d.render_tempo_bpm:g}bpm-'
                      f'{d.max_pieces}')


def build(config: ml_collections.ConfigDict) -> MusicjaxChorales:
  """Prepares the dataset once (under a lock: processes may share a machine)."""
  data_dir = tfds_data_dir(config)
  os.makedirs(data_dir, exist_ok=True)
  builder = MusicjaxChorales(musicjax_config=config, data_dir=data_dir,
                             file_format='array_record')
  with locks.locked(os.path.join(data_dir, '.lock')):
    builder.download_and_prepare()
  return builder


def data_source(config: ml_collections.ConfigDict, split: str):
  """The random-access source of `split`, building the dataset if needed."""
  build(config)
  return tfds.data_source(NAME, split=split, data_dir=tfds_data_dir(config))


def to_item(index: int, example: dict[str, Any]) -> dict[str, Any]:
  """A pipeline item: the mix as in-memory 16-bit WAV bytes."""
  buf = io.BytesIO()
  sr = int(example['sample_rate'])
  sf.write(buf, np.asarray(example['mix'], np.int16), sr, format='WAV',
           subtype='PCM_16')
  meta = example['meta']
  meta = json.loads(meta.decode('utf-8') if isinstance(meta, bytes) else meta)
  ident = example['id']
  ident = ident.decode('utf-8') if isinstance(ident, bytes) else ident
  return {'name': f'{NAME}#{index} ({ident})', 'source': buf.getvalue(),
          'meta': meta}
