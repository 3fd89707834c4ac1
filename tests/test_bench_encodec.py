"""`musicjax bench codec` on the released EnCodec architecture (LSTM, ELU,
reflect padding, conv shortcuts): it runs, prints the x-real-time keys, and
times as many parameters as transformers' EncodecModel at the same numbers,
so the side-by-side figures of docs/figures.md compare one architecture.
Tiny sizes; no timing is asserted."""
import json
import os

import pytest

from musicjax import cli

transformers = pytest.importorskip('transformers')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILTERS, HIDDEN = 4, 16   # EncodecConfig num_filters, hidden_size


@pytest.mark.parametrize('name, theirs', [
    ('encodec_24khz', {}),
    ('encodec_32khz', dict(sampling_rate=32000, upsampling_ratios=[8, 5, 4, 4],
                           use_causal_conv=False, use_conv_shortcut=False)),
])
def test_bench_times_encodecs_architecture(name, theirs, capsys):
  assert cli.main([
      'bench', 'codec', '--config',
      os.path.join(REPO, 'configs', 'codec', name + '.py'),
      f'--config.model.encoder_dim={FILTERS}',
      f'--config.model.decoder_dim={FILTERS * 16}',
      f'--config.model.latent_dim={HIDDEN}',
      f'--config.model.rvq.codebook_dim={HIDDEN}',
      '--config.model.rvq.codebook_size=16', '--config.model.rvq.num_codebooks=2',
      '--seconds', '0.1', '--repeats', '1']) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in ('encode', 'decode', 'encode_decode'):
    assert out[f'{key}_rtf'] > 0 and out[f'{key}_rtf_best'] > 0
  assert out['machine']['cpu_count'] > 0 and 'load_1min_start' in out['machine']
  c = transformers.EncodecConfig(num_filters=FILTERS, hidden_size=HIDDEN,
                                 codebook_size=16, **theirs)
  want = sum(p.numel() for p in transformers.EncodecModel(c).parameters())
  assert out['params'] == want
