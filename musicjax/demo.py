"""`make demo`: render chorales, train the tiny codec, evaluate it, write a listening kit.

    python -m musicjax.demo --workdir runs/demo [--config.train.steps=200 ...]

Writes WORKDIR/{metrics.jsonl, eval.json, original.wav, reconstruction.wav,
spectrograms.png} plus checkpoints and TensorBoard files. Re-running resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, 'configs', 'codec', 'tiny.py')


def spectrogram_png(original: np.ndarray, recon: np.ndarray, sr: int, path: str,
                    title: str) -> None:
  import librosa
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
  for ax, wave, name in ((axes[0], original, 'original'), (axes[1], recon, 'reconstruction')):
    mel = librosa.feature.melspectrogram(y=wave, sr=sr, n_fft=1024, hop_length=256, n_mels=80)
    img = librosa.power_to_db(mel, ref=np.max)
    ax.imshow(img, origin='lower', aspect='auto', cmap='magma',
              extent=(0, len(wave) / sr, 0, 80))
    ax.set_ylabel('mel bin')
    ax.set_title(name)
  axes[1].set_xlabel('seconds')
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def listening_kit(config, workdir: str, seconds: float) -> dict:
  """Reconstructs an eval-split chorale excerpt and writes wavs + a spectrogram PNG."""
  import soundfile as sf
  from musicjax.codec import chunked
  from musicjax.data import audio as audio_io
  from musicjax.data import chorales
  from musicjax.train import trainer

  pieces = chorales.chorale_manifest(config, 'eval')
  piece = pieces[0]
  sr = int(config.data.sample_rate)
  wave = audio_io.load_audio(piece['stems']['mix'], sr, int(config.data.channels))
  wave = wave[:int(seconds * sr)]
  task, _, state = trainer.restore_for_inference(config, workdir)
  model = task.inference_model(state)
  codes = chunked.encode_array(model, wave)
  recon = chunked.decode_array(model, codes)[:wave.shape[0]]
  sf.write(os.path.join(workdir, 'original.wav'), wave, sr)
  sf.write(os.path.join(workdir, 'reconstruction.wav'), np.clip(recon, -1, 1), sr)
  meta = piece.get('meta', {})
  title = f"{meta.get('title', piece['id'])} (BWV {piece.get('bwv', '?')}), eval split"
  spectrogram_png(wave[:, 0], recon[:, 0], sr, os.path.join(workdir, 'spectrograms.png'),
                  title)
  return {'piece': meta.get('title', piece['id']), 'bwv': piece.get('bwv'),
          'seconds': wave.shape[0] / sr, 'codes_shape': list(codes.shape)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', default='runs/demo')
  p.add_argument('--config', default=DEFAULT_CONFIG)
  p.add_argument('--listen-seconds', type=float, default=8.0)
  args, rest = p.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)

  from musicjax import config as cfg
  from musicjax.errors import UserError
  from musicjax.train import trainer
  try:
    config = cfg.load(args.config, rest)
    t0 = time.time()
    print(f'[demo] 1/3 render chorales + train the tiny codec ({config.train.steps} steps) '
          f'in {args.workdir}', flush=True)
    trainer.train(config, args.workdir)
    print('[demo] 2/3 evaluate on the eval split (held-out BWV numbers)', flush=True)
    metrics = trainer.evaluate(config, args.workdir)
    with open(os.path.join(args.workdir, 'eval.json'), 'w') as f:
      json.dump(metrics, f, indent=2, sort_keys=True)
    print('[demo] 3/3 reconstruct an eval chorale', flush=True)
    kit = listening_kit(config, args.workdir, args.listen_seconds)
  except UserError as e:
    print(f'demo: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps({'eval': metrics, 'listen': kit,
                    'minutes': round((time.time() - t0) / 60, 1)}, sort_keys=True))
  print(f'[demo] done: listen to {args.workdir}/original.wav vs reconstruction.wav, '
        f'look at {args.workdir}/spectrograms.png, '
        f'`tensorboard --logdir {args.workdir}` for curves.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
