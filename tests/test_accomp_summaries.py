"""The accompaniment model's TensorBoard summaries: the first eval vocal
accompanied and decoded with the token set's codec (accompaniment, reference,
mix and spectrograms), token images without a codec, the sampler traced once
per run."""
import json
import os
import types

import numpy as np
import pytest

from musicjax.accomp import sample as sample_lib
from musicjax.prepare import tokens as prepare_tokens
from musicjax.data import token_records
from musicjax.train import trainer
from tests import audio_fixtures as fx
from tests import codec_fixtures as cf
from tests.test_accomp_train import small_config
from tests.test_lm_summaries import summary_values, wav_samples

SR = 8000             # codec_fixtures.small_config: hop 16 -> 500 frames/s
SECONDS = 1.2
CLIP_SECONDS = 0.02   # config.summary.seconds: 10 of the window's 16 frames


@pytest.fixture(scope='module')
def stem_tokens(tmp_path_factory):
  """(token dir, dataset.json): stem songs tokenized by an untrained codec."""
  tmp = tmp_path_factory.mktemp('accomp_summaries')
  src = str(tmp / 'songs')
  for i, name in enumerate(('a', 'b', 'c', 'd', 'e', 'f')):
    song = os.path.join(src, name)
    os.makedirs(song)
    f0 = 220.0 * 2 ** (i / 12)
    fx.write(os.path.join(song, 'vocals.wav'), fx.tone(SECONDS, SR, 2 * f0), SR)
    fx.write(os.path.join(song, 'accompaniment.wav'), fx.tone(SECONDS, SR, f0),
             SR)
    with open(os.path.join(song, 'meta.json'), 'w', encoding='utf-8') as f:
      json.dump({'tags': 'genre: chorale; mood: calm'}, f)
  c = cf.small_config()
  c.data.kind, c.data.path, c.data.eval_fraction = 'folder', src, 0.4
  c.data.records_per_shard = 2
  c.data.batch_size = c.data.eval_batch_size = 8
  cf.untrained_run(c, str(tmp / 'codec'))
  tokens = str(tmp / 'tokens')
  prepare_tokens.prepare_tokens_main(str(tmp / 'codec'), tokens, c, stems=True)
  return tokens, token_records.read_dataset_info(tokens)


def count_traces(monkeypatch):
  traces = []
  real = sample_lib.accompany

  def counted(*args, **kwargs):
    traces.append(1)
    return real(*args, **kwargs)
  monkeypatch.setattr(sample_lib, 'accompany', counted)
  return traces


def _train_config(steps):
  c = small_config(steps=steps)
  tr = c.train
  tr.log_every, tr.checkpoint_every, tr.eval_every, tr.eval_steps = 1, steps, 2, 1
  c.sample.steps = 4
  return c


@pytest.mark.slow
def test_eval_steps_write_accompaniment_mix_and_spectrograms(stem_tokens, tmp_path,
                                                            monkeypatch):
  tokens, info = stem_tokens
  traces = count_traces(monkeypatch)
  c = _train_config(4)
  c.model.num_codebooks, c.model.codebook_size = (info['num_codebooks'],
                                                  info['codebook_size'])
  c.model.frame_rate = info['frame_rate']
  c.model.text_vocab_size = 1024
  c.data.kind, c.data.path = 'tokens', tokens
  c.sample.cfg_scale = 2.0            # guided: the null prefix is used too
  c.summary.seconds = CLIP_SECONDS
  wd = str(tmp_path / 'accomp')
  trainer.train(c, wd)
  values = summary_values(wd)
  tags = ('audio/accompaniment', 'audio/reference', 'audio/mix',
          'image/spectrogram')
  for tag in tags:
    assert [s for s, _ in values[tag]] == [2, 4], (tag, values.keys())
  assert 'image/tokens' not in values
  frames = round(CLIP_SECONDS * info['frame_rate'])
  assert frames < c.data.max_frames     # the clip, not the whole window
  for tag in tags[:3]:
    for _, v in values[tag]:
      assert v.audio.sample_rate == SR == info['sample_rate']
      wave = wav_samples(v.audio)
      assert len(wave) == frames * info['hop_length'], tag
      assert np.abs(wave).max() > 0, tag
  for _, v in values['image/spectrogram']:
    assert v.image.height > 100 and v.image.width > 100
  assert len(traces) == 1               # two summaries, one trace


def test_synthetic_tokens_give_token_images_without_audio(tmp_path, capsys):
  wd = str(tmp_path / 'accomp')
  trainer.train(_train_config(2), wd)
  values = summary_values(wd)
  assert [s for s, _ in values['image/tokens']] == [2]
  img = values['image/tokens'][0][1].image
  assert img.height > 100 and img.width > 100
  assert not [t for t in values if t.startswith('audio/')]
  assert 'summaries failed' not in capsys.readouterr().err


def test_zero_seconds_turns_the_summaries_off():
  from musicjax.accomp import task as task_lib
  from musicjax.config import ConfigError
  c = _train_config(2)
  c.summary.seconds = 0.0
  state = types.SimpleNamespace(model=None)   # never run: nothing to write
  assert task_lib.AccompTask(c).summaries(state, {}, None) == {}
  c.summary.seconds = -1.0
  with pytest.raises(ConfigError, match='config.summary.seconds'):
    task_lib.AccompTask(c)
