"""`musicjax bench accomp` measures the sampler on whole songs (tiny shapes
here; the real figures come from configs/accomp/tiny.py in docs/figures.md)."""
import json
import os

import jax

from musicjax import cli
from musicjax.bench import accomp as bench
from musicjax.bench import accomp_experiments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TINY_CONFIG = '''
from musicjax.config import for_task
def get_config():
  c = for_task('accomp')
  m = c.model
  m.num_codebooks, m.codebook_size, m.text_vocab_size, m.frame_rate = 2, 16, 8, 20.0
  b = m.backbone
  b.num_layers, b.dim, b.num_heads, b.num_kv_heads, b.mlp_dim = 1, 32, 2, 1, 64
  b.attention_chunk = 16
  c.data.reference_frames, c.data.max_text_tokens = 4, 4
  c.sample.steps = 6
  return c
'''


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_reports_rtf_for_both_lengths_with_and_without_guidance(
    tmp_path, monkeypatch, capsys):
  cfg = tmp_path / 'c.py'
  cfg.write_text(TINY_CONFIG)
  monkeypatch.setattr(bench, 'SECONDS', (1.0, 2.0))
  assert cli.main(['bench', 'accomp', '--config', str(cfg), '--repeats', '1']) == 0
  out = _last_json(capsys)
  # Default lengths: SECONDS at the config's 20 Hz.
  assert [s['frames'] for s in out['songs']] == [20, 40]
  for song in out['songs']:
    for name in ('nocfg', 'cfg'):
      assert song[f'rtf_{name}'] > 0 and song[f'wall_s_{name}'] > 0
  assert out['sample_steps'] == 6 and out['attention_chunk'] == 16
  # The short song runs every step; the long one times 3 and scales.
  assert [(s['steps'], s['timed_steps']) for s in out['songs']] == [(6, 6), (6, 3)]
  assert out['machine']['cpu_count'] >= 1
  assert isinstance(out['machine']['load_1min_start'], float)


def test_frames_and_steps_flags_set_what_is_timed(tmp_path, monkeypatch, capsys):
  cfg = tmp_path / 'c.py'
  cfg.write_text(TINY_CONFIG)
  compiled = []
  real = bench.compile_sampler

  def spy(model, config, frames, cfg_on, s):
    compiled.append((frames, s.steps, cfg_on))
    return real(model, config, frames, cfg_on, s)

  monkeypatch.setattr(bench, 'compile_sampler', spy)
  assert cli.main(['bench', 'accomp', '--config', str(cfg), '--repeats', '1',
                   '--frames', '8,24', '--steps', '2,3',
                   '--config.model.backbone.num_layers=2']) == 0
  out = _last_json(capsys)
  assert [(s['frames'], s['steps'], s['timed_steps']) for s in out['songs']] == [
      (8, 2, 2), (24, 3, 3)]
  # Every given step is run (no scaling), with and without guidance.
  assert compiled == [(8, 2, False), (8, 2, True), (24, 3, False), (24, 3, True)]
  assert out['songs'][1]['seconds'] == 24 / 20.0
  # --config.model.* overrides reach the timed model.
  assert out['model']['layers'] == 2 and out['params'] > 0


def test_steps_must_match_frames(tmp_path, capsys):
  cfg = tmp_path / 'c.py'
  cfg.write_text(TINY_CONFIG)
  assert cli.main(['bench', 'accomp', '--config', str(cfg), '--frames', '8,24',
                   '--steps', '2,3,4']) == 2
  err = capsys.readouterr().err
  assert '--steps' in err and '--frames' in err


def test_frames_is_refused_where_it_means_nothing(capsys):
  assert cli.main(['bench', 'accomp-context', '--frames', '8']) == 2
  assert 'takes no --frames' in capsys.readouterr().err


def test_vampnet_tiny_size_config_has_vampnets_shape():
  from flax import nnx
  from musicjax import config as config_lib
  from musicjax.accomp import task as task_lib
  c = config_lib.load(os.path.join(REPO, 'configs', 'accomp',
                                   'vampnet_tiny_size.py'))
  b = c.model.backbone
  assert (b.num_layers, b.dim, b.num_heads, b.num_kv_heads) == (8, 256, 4, 4)
  assert (c.model.num_codebooks, c.model.codebook_size) == (4, 1024)
  # 750 frames are the peer's 30 s.
  assert 750 / c.model.frame_rate == 30.0
  with nnx.use_eager_sharding(False):
    state = nnx.eval_shape(lambda: task_lib.AccompState(c, nnx.Rngs(0)))
  layers = nnx.state(state.model.backbone, nnx.Param)
  # Per layer as VampNet's: 4 x 256^2 attention + 3 x 256 x 512 FFN (+ norms).
  per_layer = 4 * 256 ** 2 + 3 * 256 * 512
  n = sum(x.size for x in jax.tree.leaves(layers))
  assert 8 * per_layer <= n < 8 * per_layer * 1.01, n


def test_weighting_experiment_trains_and_reports_each_weighting(monkeypatch,
                                                                 capsys):
  # One weighting keeps the test short (each run compiles a train step);
  # the loop over diffusion.LOSS_KINDS is the same for all of them.
  monkeypatch.setattr(accomp_experiments.diffusion, 'LOSS_KINDS', ('elbo',))
  out = accomp_experiments.weighting_experiment(steps=2, seeds=1)
  assert len(out['eval_ce_masked_elbo']) == 1
  # Two steps from a random init: near log V, and finite.
  assert 0 < out['eval_ce_masked_elbo_mean'] < 2 * out['log_v']
  assert 'none' not in str(out.keys())
  assert 'elbo:' in capsys.readouterr().out


def test_context_experiment_runs_each_model_on_the_chain(monkeypatch, capsys):
  seen = []
  real_train = accomp_experiments.trainer.train

  def train(config, workdir):
    seen.append((config.data.synthetic_task, config.model.decode,
                 config.model.num_codebooks, config.loss.rtd_weight))
    return real_train(config, workdir)

  monkeypatch.setattr(accomp_experiments.trainer, 'train', train)
  # One AR case keeps the test short; every case goes through the same loop.
  monkeypatch.setattr(accomp_experiments, 'CONTEXT_RUNS', (('ar_k2', 'ar', 2),))
  assert cli.main(['bench', 'accomp-context', '--steps', '2', '--seeds', '1']) == 0
  assert seen == [('chain', 'ar', 2, 0.0)]
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0 < out['eval_ce0_ar_k2_mean'] < 2 * out['log_v']
  assert out['machine']['cpu_count'] >= 1
  assert 'busy' in out['machine']
