"""`musicjax bench accomp` measures the sampler on whole songs (tiny shapes
here; the real figures come from configs/accomp/tiny.py in README)."""
import json

from musicjax import cli
from musicjax.accomp import bench


def test_bench_reports_rtf_for_both_lengths_with_and_without_guidance(
    tmp_path, monkeypatch, capsys):
  cfg = tmp_path / 'c.py'
  cfg.write_text('''
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
''')
  monkeypatch.setattr(bench, 'SECONDS', (1.0, 2.0))
  assert cli.main(['bench', 'accomp', '--config', str(cfg), '--repeats', '1']) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in ('1s_nocfg', '1s_cfg', '2s_nocfg', '2s_cfg'):
    assert out[f'rtf_{key}'] > 0 and out[f'wall_s_{key}'] > 0
  assert out['steps'] == 6 and out['attention_chunk'] == 16
  # The short song runs every step; the long one times 3 and scales.
  assert out['timed_steps_1s_cfg'] == 6 and out['timed_steps_2s_cfg'] == 3
  assert out['machine']['cpu_count'] >= 1


def test_weighting_experiment_trains_and_reports_each_weighting(monkeypatch,
                                                                 capsys):
  # One weighting keeps the test short (each run compiles a train step);
  # the loop over diffusion.LOSS_KINDS is the same for all of them.
  monkeypatch.setattr(bench.diffusion, 'LOSS_KINDS', ('elbo',))
  out = bench.weighting_experiment(steps=2, seeds=1)
  assert len(out['eval_ce_masked_elbo']) == 1
  # Two steps from a random init: near log V, and finite.
  assert 0 < out['eval_ce_masked_elbo_mean'] < 2 * out['log_v']
  assert 'none' not in str(out.keys())
  assert 'elbo:' in capsys.readouterr().out


def test_context_experiment_runs_each_model_on_the_chain(monkeypatch, capsys):
  seen = []
  real_train = bench.trainer.train

  def train(config, workdir):
    seen.append((config.data.synthetic_task, config.model.decode,
                 config.model.num_codebooks, config.loss.rtd_weight))
    return real_train(config, workdir)

  monkeypatch.setattr(bench.trainer, 'train', train)
  # One AR case keeps the test short; every case goes through the same loop.
  monkeypatch.setattr(bench, 'CONTEXT_RUNS', (('ar_k2', 'ar', 2),))
  assert cli.main(['bench', 'accomp-context', '--steps', '2', '--seeds', '1']) == 0
  assert seen == [('chain', 'ar', 2, 0.0)]
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0 < out['eval_ce0_ar_k2_mean'] < 2 * out['log_v']
  assert out['machine']['cpu_count'] >= 1
