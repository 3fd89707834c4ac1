"""`musicjax prepare --codec-workdir`: a dataset encoded to codec tokens, for the LM.

The codec runs once here instead of in every LM training step. The steps, each
in its own module:
  * `token_items`: the songs of each split (with --stems, a folder of song
    folders), and the id each record gets;
  * `token_augment`: augmented copies (`config.data.augment`) and stem
    statistics;
  * `token_encode`: one song -> one record (codes, melody, metadata), at the
    codec's sample rate and channels; the records are described in
    `token_records`;
  * `token_shards`: the shards of a split, split over processes and resumed
    per song by a rerun with the same --out.

Bad items (unreadable audio, bad stems, metadata the LM cannot turn into text)
are reported with `audio.report_bad`, listed in the shard's sidecar and in
dataset.json, and skipped.

At the end process 0 trains DIR/tokenizer.json on the train records' texts
(unless it exists) and writes DIR/dataset.json, which marks a finished run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from musicjax.data import audio
from musicjax.data import sources
from musicjax.data import text
from musicjax.data import token_records
from musicjax.errors import UserError
from musicjax.lm import musicgen_chroma
from musicjax.prepare import token_augment
from musicjax.prepare import token_encode
from musicjax.prepare import token_items
from musicjax.prepare import token_shards
from musicjax.train import runs

logger = logging.getLogger('musicjax.data')


def _train_tokenizer(out_dir: str, config: ml_collections.ConfigDict) -> str:
  """DIR/tokenizer.json from the train records' texts, unless it exists."""
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


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def prepare_tokens_main(
    codec_workdir: str, out_dir: str,
    config: ml_collections.ConfigDict | None = None, stems: bool = False,
    chunk_seconds: float = token_encode.DEFAULT_CHUNK_SECONDS,
    context_seconds: float = token_encode.DEFAULT_CONTEXT_SECONDS,
    batch: int | None = None,
    chroma: musicgen_chroma.ChromaSettings | None = None) -> dict[str, Any]:
  """Encodes a dataset with a trained codec into token shards under `out_dir`.

  Args:
    codec_workdir: a codec training workdir (config.json + checkpoints).
    out_dir: the output directory; rerunning with the same one resumes.
    config: which data to encode (`config.data`) and how to augment it
      (`config.data.augment`, `token_augment`); None: the codec's own.
    stems: also store vocal/accompaniment codes (chorales, or folder with the
      song-folder convention of `token_items`).
    chunk_seconds: encoder window length (see `codec.chunked`).
    context_seconds: context on each side of a window.
    batch: windows per encoder call (None: the local device count).
    chroma: also store MusicGen-Melody's chroma classes of every song, at
      these feature-extractor settings (`token_encode`); None: none.

  Returns:
    {'train': records, 'eval': records, 'bad_files': count, 'seconds': wall}.
  """
  start = time.perf_counter()
  codec = runs.load_run(codec_workdir, expect='codec', verb='prepare',
                        flag='--codec-workdir')
  codec_config, model, step = codec.config, codec.model, codec.step
  config = codec_config if config is None else config
  enc = token_encode.Encoder(
      model, int(codec_config.data.sample_rate), int(codec_config.data.channels),
      chunk_seconds, context_seconds, batch or jax.local_device_count(), chroma)
  chroma_info = None if chroma is None else dataclasses.asdict(chroma)
  os.makedirs(out_dir, exist_ok=True)
  settings = {'format': token_records.FORMAT,
              'codec_workdir': os.path.abspath(codec_workdir), 'codec_step': step,
              'data': sources.describe(config), 'stems': bool(stems),
              'records_per_shard': int(config.data.records_per_shard),
              'process_count': jax.process_count(),
              'augment': token_augment.augment_settings(config, stems),
              'chroma': chroma_info}
  if settings['records_per_shard'] < 1:
    raise UserError('config.data.records_per_shard must be >= 1, got '
                    f'{settings["records_per_shard"]}')

  def encode(item):
    return token_encode.encode_item(item, enc, config, stems, model.codebook_size)

  split_settings = {}
  for split in sources.SPLITS:
    items = token_items.split_items(config, split, stems)
    if split == 'train':  # evaluation sees the songs as they are
      items = token_augment.speed_pitch_variants(items, config,
                                                 settings['augment'])
    split_settings[split] = token_shards.split_settings(settings, split, items)
    token_shards.prepare_split(split, items, out_dir, split_settings[split],
                               encode)
  _barrier('musicjax prepare tokens: shards written')
  summary = token_shards.summarise(out_dir, split_settings)
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
            'augment': settings['augment'], 'chroma': chroma_info,
            'tokenizer': os.path.basename(tokenizer), **summary}
    token_shards.atomic_write_json(
        os.path.join(out_dir, token_records.DATASET_INFO), info)
  _barrier('musicjax prepare tokens: dataset.json written')
  out = dict(summary['splits'], bad_files=len(summary['bad_files']),
             seconds=time.perf_counter() - start)
  logger.info('musicjax: token dataset %s: %s', out_dir, out)
  return out
