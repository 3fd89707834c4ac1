"""`musicjax bench heartcodec-decode` and `heartmula-memory` on the tiny
HeartMuLa / HeartCodec configs: the figures they report are the ones asked
for (no timing or memory size is asserted beyond what the shapes fix)."""
import json
import os

import pytest

from musicjax import cli
from musicjax import config as config_lib
from musicjax.bench import heartmula
from musicjax.cli import bench as bench_cli
from musicjax.codec.heartcodec import config as codec_config
from musicjax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LM = os.path.join(REPO, 'configs', 'lm', 'heartmula_tiny.py')
TINY_CODEC = os.path.join(REPO, 'configs', 'codec', 'heartcodec_tiny.py')
BF16_BYTES = 2
# Tiny prompts: heartmula_tiny's rotary table has 64 slots.
TINY_PROMPT = (4, 8)


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_heartcodec_decode_reports_x_real_time_and_windows(capsys):
  # 8 s of codes: one 7.44 s window and one more hop of the tiny config.
  assert cli.main(['bench', 'heartcodec-decode', '--config', TINY_CODEC,
                   '--seconds', '8', '--repeats', '2']) == 0
  out = _last_json(capsys)
  assert out['code_frames'] == 100 and out['audio_seconds'] == 8.0
  assert out['windows'] == 2
  assert out['sample_rate'] == 300 and out['num_steps'] == 10
  assert 0 < out['seconds_best'] <= out['seconds']
  assert out['rtf'] == pytest.approx(out['audio_seconds'] / out['seconds'])
  assert out['rtf_best'] >= out['rtf'] > 0
  assert out['seconds_per_window'] == pytest.approx(out['seconds'] / 2)
  assert out['params'] > 0
  assert out['machine']['cpu_count'] >= 1


def test_heartmula_memory_counts_bf16_parameters_and_programs():
  out = heartmula.memory(config_lib.load(TINY_LM),
                         codec_config.load(TINY_CODEC), seconds=1.0,
                         prompt_tokens=TINY_PROMPT)
  gib = heartmula.GIB
  # Parameters: every one in bfloat16, both models resident.
  assert out['lm_params_gib'] * gib == out['lm_params'] * BF16_BYTES
  assert out['codec_params_gib'] * gib == out['codec_params'] * BF16_BYTES
  assert out['params_gib'] == pytest.approx(out['lm_params_gib']
                                            + out['codec_params_gib'])
  assert set(out['programs']) == {'lm_generate', 'codec_latent_window',
                                  'codec_waveform'}
  for name, p in out['programs'].items():
    for key in ('argument_gib', 'output_gib', 'temp_gib', 'working_gib'):
      assert p[key] > 0, (name, key)
    assert p['total_gib'] == pytest.approx(
        p['argument_gib'] + p['output_gib'] + p['temp_gib'])
  lm = out['programs']['lm_generate']
  # 12.5 Hz: 1 s is 12 frames (12.5 rounds to even); CFG doubles the batch.
  assert lm['frames'] == 12 and lm['batch'] == 2
  assert lm['prompt_slots'] == sum(TINY_PROMPT) + 1
  # The LM program reads every LM parameter (and its inputs beside them).
  assert lm['argument_gib'] >= out['lm_params_gib']
  worst = max(p['working_gib'] for p in out['programs'].values())
  assert out['peak_gib'] == pytest.approx(out['params_gib'] + worst)
  assert out['within_goal'] and out['peak_gb'] < out['goal_gb']
  assert out['peak_one_model_at_a_time_gb'] < out['peak_gb']
  assert out['within_goal_one_model_at_a_time']


def test_heartmula_memory_in_float32_doubles_the_parameters():
  bf16 = heartmula.codec_programs(codec_config.load(TINY_CODEC), 'bfloat16')
  f32 = heartmula.codec_programs(codec_config.load(TINY_CODEC), 'float32')
  assert f32[1] == 2 * bf16[1] and f32[2] == bf16[2]


def test_heartmula_memory_refuses_a_song_past_the_rotary_table():
  with pytest.raises(UserError, match='max_seq_len'):
    heartmula.memory(config_lib.load(TINY_LM), codec_config.load(TINY_CODEC),
                     seconds=10.0, prompt_tokens=TINY_PROMPT)


def test_bench_help_lists_the_heartmula_benches(capsys):
  with pytest.raises(SystemExit):
    cli.main(['bench', '--help'])
  text = capsys.readouterr().out
  for what in bench_cli.RELEASED:
    assert what in text
  assert '--codec-config' in text and '--param-dtype' in text


def test_codec_config_flag_is_for_heartmula_memory_only(capsys):
  assert cli.main(['bench', 'heartcodec-decode', '--config', TINY_CODEC,
                   '--codec-config', TINY_CODEC]) == 2
  assert 'takes no --codec-config' in capsys.readouterr().err


def test_heartmula_memory_from_the_command_line(capsys):
  # The default prompt (513 slots) needs a longer rotary table than tiny's.
  assert cli.main(['bench', 'heartmula-memory', '--config', TINY_LM,
                   '--codec-config', TINY_CODEC, '--seconds', '2',
                   '--config.model.max_seq_len=1024']) == 0
  out = _last_json(capsys)
  assert out['song_seconds'] == 2.0 and out['param_dtype'] == 'bfloat16'
  assert out['programs']['lm_generate']['prompt_slots'] == (
      heartmula.TAG_TOKENS + 1 + heartmula.LYRIC_TOKENS)
  assert out['peak_gib'] > out['params_gib'] > 0
