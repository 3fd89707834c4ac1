"""The codec and LM benches, and the machine context every bench carries:
they measure what their flags ask for (tiny sizes; no timing is asserted)."""
import json
import os

from flax import nnx

from musicjax import runtime
from musicjax import cli
from musicjax import config as config_lib
from musicjax.bench import lm as lm_bench
from musicjax.bench import machine
from musicjax.bench import measure
from musicjax.codec.model import CodecModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODEC_PARAMS = 14.85e6   # EnCodec 24 kHz, encodec_model_24khz().parameters()


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


LM_CONFIG = os.path.join(REPO, 'configs', 'lm', 'tiny.py')
TINY_LM = [
    '--config.model.num_codebooks=2', '--config.model.codebook_size=64',
    '--config.model.text_vocab_size=64', '--config.model.backbone.dim=32',
    '--config.model.local.dim=32', '--config.model.backbone.mlp_dim=64',
    '--config.model.local.mlp_dim=64', '--config.model.backbone.num_layers=1',
    '--config.model.local.num_layers=1', '--config.data.max_frames=8',
    '--config.data.max_text_tokens=8', '--config.data.reference_frames=4',
    '--config.data.batch_size=8', '--config.data.markov_noise=(2,)',
    '--config.sample.top_k=4']


def test_machine_reports_cpu_cores_and_load_at_start_and_end(monkeypatch):
  loads = iter([(0.25, 0.0, 0.0), (0.5, 0.0, 0.0)])
  monkeypatch.setattr(machine.os, 'getloadavg', lambda: next(loads))
  start = runtime.load_now()
  m = machine.describe(start)
  assert m['load_1min_start'] == 0.25 and m['load_1min_end'] == 0.5
  assert isinstance(m['load_1min_end'], float)
  assert m['cpu_count'] >= 1 and m['cpu_model']
  assert m['busy'] is False and 'busy_note' not in m


def test_machine_is_busy_when_the_load_exceeds_the_cores(monkeypatch, capsys):
  cores = os.cpu_count() or 1
  high = machine.BUSY_LOAD_PER_CORE * cores + 1
  monkeypatch.setattr(machine.os, 'getloadavg', lambda: (high, high, high))
  m = machine.describe(0.1)     # quiet at the start, busy by the end
  assert m['busy'] is True and 'other jobs' in m['busy_note']
  assert 'warning' in capsys.readouterr().err


def test_machine_without_a_load_average(monkeypatch):
  def none():
    raise OSError('no load average')
  monkeypatch.setattr(machine.os, 'getloadavg', none)
  m = machine.describe(runtime.load_now())
  assert m['load_1min_start'] is None and m['busy'] is False


def test_codec_bench_reports_params_and_x_real_time(capsys):
  assert cli.main(['bench', 'codec', '--config',
                   os.path.join(REPO, 'configs', 'codec', 'tiny.py'),
                   '--seconds', '0.5', '--repeats', '2']) == 0
  out = _last_json(capsys)
  for key in ('encode', 'decode', 'encode_decode'):
    assert out[f'{key}_rtf'] > 0 and out[f'{key}_rtf_best'] > 0
  assert out['params'] > 0 and out['params_and_buffers'] >= out['params']
  assert out['machine']['load_1min_start'] is not None


def test_encodec_size_config_matches_encodecs_size_and_setting():
  c = config_lib.load(os.path.join(REPO, 'configs', 'codec',
                                   'encodec_24khz_size.py'))
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: CodecModel(
        c.model, c.data.sample_rate, c.data.channels, rngs=nnx.Rngs(0)))
  n = measure.param_count(model)
  assert abs(n - ENCODEC_PARAMS) < 0.05 * ENCODEC_PARAMS, n
  # 24 kHz mono, 75 Hz, 8 x 1024 = 6 kbps.
  assert (c.data.sample_rate, c.data.channels) == (24000, 1)
  assert model.frame_rate == 75.0
  assert (model.num_codebooks, model.codebook_size) == (8, 1024)


def test_gemm_peak_is_the_best_library(monkeypatch):
  out = machine.gemm_peak(size=64, repeats=1)
  by_lib = out['flops_per_s']
  assert {'jax', 'numpy', 'torch'} <= set(by_lib)  # torch: a test dependency
  assert out['best'] == max(by_lib.values())
  assert by_lib[out['best_library']] == out['best']
  # Each library is timed on its own: the best follows whichever is fastest.
  monkeypatch.setattr(measure, 'best_time',
                      lambda fn, repeats: 1.0 if fn() is None else 2.0)
  monkeypatch.setattr(machine, 'gemm_timers', lambda size: {
      'jax': lambda: 0, 'numpy': lambda: None, 'torch': lambda: 0})
  out = machine.gemm_peak(size=8, repeats=1)
  assert out['best_library'] == 'numpy' and out['best'] == 2 * 8 ** 3


def test_lm_decode_reports_each_requested_length(capsys, monkeypatch):
  seen = {}
  real = lm_bench.decode

  def decode(config, repeats, frames):
    seen['frames'] = frames
    return real(config, repeats=repeats, frames=frames, breakdown_iters=2)

  monkeypatch.setattr(lm_bench, 'decode', decode)
  assert cli.main(['bench', 'lm-decode', '--config', LM_CONFIG, *TINY_LM,
                   '--repeats', '1', '--frames', '3,9']) == 0
  out = _last_json(capsys)
  assert seen['frames'] == (3, 9)
  assert [c['frames'] for c in out['lengths']] == [3, 9]
  for case in out['lengths']:
    for name in ('cfg', 'nocfg'):
      assert case[f'ms_per_frame_{name}'] > 0
  # Top-level figures are the first length's.
  assert out['frames'] == 3
  assert out['ms_per_frame_cfg'] == out['lengths'][0]['ms_per_frame_cfg']
  assert 'load_1min_end' in out['machine']


def test_lm_train_mfu_is_against_the_best_gemm(monkeypatch):
  peak = {'size': 8, 'flops_per_s': {'jax': 1e9, 'numpy': 3e9, 'torch': 2e9},
          'best': 3e9, 'best_library': 'numpy'}
  monkeypatch.setattr(machine, 'gemm_peak', lambda: peak)
  out = lm_bench.train(config_lib.load(LM_CONFIG, TINY_LM), repeats=1)
  assert out['gemm_peak_flops_per_s'] == 3e9
  assert out['gemm_peak_library'] == 'numpy'
  assert out['gemm_flops_per_s_by_library'] == peak['flops_per_s']
  assert abs(out['mfu'] - out['model_flops_per_s'] / 3e9) < 1e-12
  assert 'busy' in out['machine']


def test_lm_memory_splits_the_state_by_its_logical_axes():
  # The sharding rules (parallel/rules.py: logical_names) put parameters and
  # AdamW moments over fsdp: two fsdp devices hold about half the state each.
  one = lm_bench.memory(config_lib.load(LM_CONFIG, TINY_LM), devices=1)
  two = lm_bench.memory(config_lib.load(
      LM_CONFIG, TINY_LM + ['--config.mesh.fsdp=2']), devices=2)
  assert two['mesh'] == {'data': 1, 'fsdp': 2, 'tensor': 1}
  assert two['params'] == one['params'] > 0
  assert 0.4 * one['state_gib'] < two['state_gib'] < 0.75 * one['state_gib']
  assert two['grads_gib'] == one['grads_gib'] / 2
