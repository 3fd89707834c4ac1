"""`make demo`: the codec, the LM and the accompaniment model, on real chorales.

    python -m musicjax.demo --workdir runs/demo [--config.train.steps=200 ...]

1. render chorales, train the tiny codec, evaluate it, reconstruct an eval
   chorale: WORKDIR/{eval.json, original.wav, reconstruction.wav, spectrograms.png}
2. tokenize the chorales with that codec, mix and stems (soprano = vocal,
   alto + tenor + bass = accompaniment): WORKDIR/stems
3. train the tiny LM on the tokens: WORKDIR/lm
4. generate 10 s from an eval chorale's tags + lyrics (lm_song.*) and 10 s
   following that chorale's soprano melody (lm_melody.*), with the chroma
   agreement of the melody clip against the melody (and of an unconditional
   clip, as the baseline) in WORKDIR/lm_eval.json.
5. train the tiny accompaniment model on the stem tokens: WORKDIR/accomp
6. accompany a held-out chorale's soprano: WORKDIR/accomp_mix.wav (the
   soprano + the generated accompaniment), accomp_stem.wav, accomp_true.wav
   (the real alto + tenor + bass), accomp_spectrograms.png (generated vs
   true), and the audio metrics against baselines on held-out chorales in
   WORKDIR/accomp_eval.{md,json}.
7. export the models to PyTorch (WORKDIR/export/<family>) and compare one
   forward pass of each with JAX: WORKDIR/export_check.json.
Re-running resumes every stage. --config.* overrides apply to the codec config.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from musicjax import cli
from musicjax import config as cfg
from musicjax.accomp import evaluate
from musicjax.accomp import song as accomp_song
from musicjax.codec import chunked
from musicjax.data import audio as audio_io
from musicjax.data import chorales
from musicjax.data import melody as melody_lib
from musicjax.data import song_text
from musicjax.errors import UserError
from musicjax.eval import plots
from musicjax.export import export as export_lib
from musicjax.export import parity
from musicjax.lm import song
from musicjax.prepare import tokens as prepare_tokens
from musicjax.train import runs
from musicjax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, 'configs', 'codec', 'tiny.py')
DEFAULT_LM_CONFIG = os.path.join(REPO, 'configs', 'lm', 'tiny.py')
DEFAULT_ACCOMP_CONFIG = os.path.join(REPO, 'configs', 'accomp', 'tiny.py')
STEPS = 9


def spectrogram_png(original: np.ndarray, recon: np.ndarray, sr: int, path: str,
                    title: str, names=('original', 'reconstruction')) -> None:
  plots.save_spectrograms({names[0]: original, names[1]: recon}, sr, path, title)


def listening_kit(config, workdir: str, seconds: float) -> dict:
  """Reconstructs an eval-split chorale excerpt and writes wavs + a spectrogram PNG."""
  import soundfile as sf

  pieces = chorales.chorale_manifest(config, 'eval')
  piece = pieces[0]
  sr = int(config.data.sample_rate)
  wave = audio_io.load_audio(piece['stems']['mix'], sr, int(config.data.channels))
  wave = wave[:int(seconds * sr)]
  model = runs.load_run(workdir, config=config, expect='codec').model
  codes = chunked.encode_array(model, wave)
  recon = chunked.decode_array(model, codes, scales=chunked.frame_scales(
      model, wave))[:wave.shape[0]]
  sf.write(os.path.join(workdir, 'original.wav'), wave, sr)
  sf.write(os.path.join(workdir, 'reconstruction.wav'), np.clip(recon, -1, 1), sr)
  meta = piece.get('meta', {})
  title = f"{meta.get('title', piece['id'])} (BWV {piece.get('bwv', '?')}), eval split"
  spectrogram_png(wave[:, 0], recon[:, 0], sr, os.path.join(workdir, 'spectrograms.png'),
                  title)
  return {'piece': meta.get('title', piece['id']), 'bwv': piece.get('bwv'),
          'seconds': wave.shape[0] / sr, 'codes_shape': list(codes.shape)}


def chroma_agreement(codes: np.ndarray, melody: np.ndarray, ctx) -> float:
  """Share of the melody's voiced frames whose chroma class the audio decoded
  from `codes` matches."""
  wave = chunked.decode_array(ctx.codec(), codes, progress=False)
  got = melody_lib.chroma_tokens(wave, int(ctx.info['sample_rate']),
                                 int(ctx.info['hop_length']))
  n = min(len(got), len(melody))
  voiced = melody[:n] >= 0
  return float(np.mean(got[:n][voiced] == melody[:n][voiced])) if voiced.any() else 0.0


def lm_stage(lm_config, workdir: str, seconds: float) -> dict:
  """Tokenize, train the LM, generate from an eval chorale's conditions."""
  tokens, lm_dir = os.path.join(workdir, 'stems'), os.path.join(workdir, 'lm')
  # The codec trains on a subset; the LM needs every chorale (with 40 songs
  # the tiny LM memorises its training set within a few hundred steps). One
  # tokenization serves both models: the LM reads the mix, the accompaniment
  # model the stems.
  codec_config = cfg.load_saved(workdir, ['--config.data.max_pieces=0'])
  print(f'[demo] 4/{STEPS} tokenize all chorales (mix + stems) with the codec '
        f'-> {tokens}', flush=True)
  prepare_tokens.prepare_tokens_main(workdir, tokens, codec_config, stems=True)
  with lm_config.unlocked():
    lm_config.data.path = tokens
  print(f'[demo] 5/{STEPS} train the tiny LM ({lm_config.train.steps} steps) in '
        f'{lm_dir}', flush=True)
  trainer.train(lm_config, lm_dir)
  print(f'[demo] 6/{STEPS} generate {seconds:g} s clips from an eval chorale',
        flush=True)
  piece = chorales.chorale_manifest(codec_config, 'eval')[0]
  meta = piece['meta']
  tags = song_text.format_tags(song_text.derive_tags(meta)).replace(
      '<tag>', '').replace('</tag>', '')
  secs = song_text.sections(meta, 1.0, int(meta.get('duration_seconds', seconds)) + 1)
  lyrics = song_text.format_lyrics([x for x in secs if x.start_frame < seconds])
  ctx = song.SongContext(lm_config, lm_dir, codec_workdir=workdir)
  out = {'piece': meta.get('title'), 'tags': tags}
  out['song'] = song.generate_song(ctx, song.SongRequest(
      tags=tags, lyrics=lyrics, seconds=seconds, seed=0),
      os.path.join(workdir, 'lm_song.wav'))
  # Melody: the chorale's soprano stem, as chroma classes per frame.
  sop = ctx.load_wave(piece['stems']['vocal'])[:int(seconds * ctx.info['sample_rate'])]
  target = melody_lib.chroma_tokens(sop, int(ctx.info['sample_rate']),
                                    int(ctx.info['hop_length']))
  req = song.SongRequest(tags=tags, melody_path=piece['stems']['vocal'],
                         seconds=seconds, seed=0)
  out['melody'] = song.generate_song(ctx, req, os.path.join(workdir, 'lm_melody.wav'))
  with np.load(os.path.join(workdir, 'lm_melody.npz')) as z:
    with_melody = z['codes']
  without = song.sample_codes(ctx, song.SongRequest(tags=tags, seconds=seconds,
                                                    seed=0), progress=False)
  out['chroma_agreement_with_melody'] = chroma_agreement(with_melody, target, ctx)
  out['chroma_agreement_without_melody'] = chroma_agreement(without, target, ctx)
  # Ceiling: the real chorale (its mix through the codec) against its soprano;
  # the mix's dominant chroma is often another voice's.
  mix = ctx.load_wave(piece['stems']['mix'])[:len(sop)]
  real = chunked.encode_array(ctx.codec(), mix)
  out['chroma_agreement_real_chorale'] = chroma_agreement(real, target, ctx)
  out['eval'] = trainer.evaluate(lm_config, lm_dir)
  with open(os.path.join(workdir, 'lm_eval.json'), 'w') as f:
    json.dump(out, f, indent=2, sort_keys=True, default=str)
  return out


def accomp_stage(accomp_config, workdir: str, seconds: float,
                 eval_songs: int) -> dict:
  """Train the tiny accompaniment model; accompany a held-out soprano."""
  import soundfile as sf
  accomp_dir = os.path.join(workdir, 'accomp')
  with accomp_config.unlocked():
    accomp_config.data.path = os.path.join(workdir, 'stems')
  print(f'[demo] 7/{STEPS} train the tiny accompaniment model '
        f'({accomp_config.train.steps} steps) in {accomp_dir}', flush=True)
  trainer.train(accomp_config, accomp_dir)
  print(f'[demo] 8/{STEPS} accompany a held-out chorale\'s soprano; audio '
        f'metrics on {eval_songs} held-out chorales', flush=True)
  codec_config = cfg.load_saved(workdir, ['--config.data.max_pieces=0'])
  piece = chorales.chorale_manifest(codec_config, 'eval')[0]
  ctx = accomp_song.AccompContext(accomp_config, accomp_dir, codec_workdir=workdir)
  sr = int(ctx.info['sample_rate'])
  n = int(seconds * sr)
  vocal = ctx.load_wave(piece['stems']['vocal'])[:n]
  clip = os.path.join(workdir, 'accomp_vocal.wav')
  sf.write(clip, vocal, sr, subtype='FLOAT')
  tags = song_text.format_tags(song_text.derive_tags(piece['meta'])).replace(
      '<tag>', '').replace('</tag>', '')
  out = accomp_song.accompany_file(
      ctx, accomp_song.AccompRequest(vocal_path=clip, tags=tags, seed=0),
      os.path.join(workdir, 'accomp_mix.wav'),
      os.path.join(workdir, 'accomp_stem.wav'))
  true = ctx.load_wave(piece['stems']['accompaniment'])[:n]
  sf.write(os.path.join(workdir, 'accomp_true.wav'), true, sr)
  stem, _ = sf.read(out['stem'], dtype='float32', always_2d=True)
  spectrogram_png(true[:, 0], stem[:len(true), 0], sr,
                  os.path.join(workdir, 'accomp_spectrograms.png'),
                  f'{piece["meta"].get("title")}: accompaniment of the soprano',
                  names=('true alto + tenor + bass', 'generated'))
  out['piece'] = piece['meta'].get('title')
  out['audio_eval'] = evaluate.evaluate_audio(
      accomp_config, accomp_dir, songs=eval_songs, seconds=seconds,
      out_dir=workdir)['metrics']
  return out


def export_stage(workdir: str, families: list[str]) -> dict:
  """Exports the demo models and runs one forward of each in JAX and in
  PyTorch: WORKDIR/export/<family>/ and WORKDIR/export_check.json."""
  import soundfile as sf
  workdirs = {'codec': workdir, 'lm': os.path.join(workdir, 'lm'),
              'accomp': os.path.join(workdir, 'accomp')}
  print(f'[demo] {STEPS}/{STEPS} export {", ".join(families)} to PyTorch and '
        'compare one forward pass with JAX', flush=True)
  report = {}
  for fam in families:
    run = runs.load_run(workdirs[fam])
    config, task, model = run.config, run.task, run.model
    out = os.path.join(workdir, 'export', fam)
    with run.activate():
      report[fam] = {'export': export_lib.export_model(model, config, out,
                                                       step=run.step)}
      if fam == 'codec':
        wave, _ = sf.read(os.path.join(workdir, 'original.wav'), dtype='float32',
                          always_2d=True)
        check = parity.codec(model, out, wave[:int(config.data.sample_rate)])
      else:
        batch = next(iter(task.dataset('eval', 0, 1)))
        compare = parity.lm if fam == 'lm' else parity.accomp
        check = compare(model, out, {k: np.asarray(v) for k, v in batch.items()})
    report[fam]['parity'] = check
    print(f'[demo]   {fam}: {json.dumps(check)}', flush=True)
  with open(os.path.join(workdir, 'export_check.json'), 'w') as f:
    json.dump(report, f, indent=2, sort_keys=True)
  return report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', default='runs/demo')
  p.add_argument('--config', default=DEFAULT_CONFIG)
  p.add_argument('--lm-config', default=DEFAULT_LM_CONFIG)
  p.add_argument('--listen-seconds', type=float, default=8.0)
  p.add_argument('--lm-seconds', type=float, default=10.0)
  p.add_argument('--accomp-config', default=DEFAULT_ACCOMP_CONFIG)
  p.add_argument('--accomp-seconds', type=float, default=10.0)
  p.add_argument('--accomp-eval-songs', type=int, default=8)
  p.add_argument('--skip-lm', action='store_true', help='stop after the codec')
  p.add_argument('--skip-accomp', action='store_true',
                 help='stop after the LM')
  args, rest = p.parse_known_args(argv)
  cli.configure_logging()
  lm = accomp = None
  try:
    config = cfg.load(args.config, rest)
    t0 = time.time()
    print(f'[demo] 1/{STEPS} render chorales + train the tiny codec ({config.train.steps} steps) '
          f'in {args.workdir}', flush=True)
    trainer.train(config, args.workdir)
    print(f'[demo] 2/{STEPS} evaluate on the eval split (held-out BWV numbers)', flush=True)
    metrics = trainer.evaluate(config, args.workdir)
    with open(os.path.join(args.workdir, 'eval.json'), 'w') as f:
      json.dump(metrics, f, indent=2, sort_keys=True)
    print(f'[demo] 3/{STEPS} reconstruct an eval chorale', flush=True)
    kit = listening_kit(config, args.workdir, args.listen_seconds)
    if not args.skip_lm:
      lm = lm_stage(cfg.load(args.lm_config), args.workdir, args.lm_seconds)
      if not args.skip_accomp:
        accomp = accomp_stage(cfg.load(args.accomp_config), args.workdir,
                              args.accomp_seconds, args.accomp_eval_songs)
    exported = export_stage(args.workdir, ['codec'] + (['lm'] if lm else []) +
                            (['accomp'] if accomp else []))
  except UserError as e:
    print(f'demo: error: {e}', file=sys.stderr)
    return 2
  summary = {'eval': metrics, 'listen': kit,
             'minutes': round((time.time() - t0) / 60, 1)}
  if lm:
    summary['lm'] = {k: lm[k] for k in ('chroma_agreement_with_melody',
                                         'chroma_agreement_without_melody',
                                         'chroma_agreement_real_chorale')}
    summary['lm']['eval_loss'] = lm['eval'].get('loss')
  if accomp:
    summary['accomp'] = accomp['audio_eval']
  summary['export_parity'] = {k: v['parity'] for k, v in exported.items()}
  print(json.dumps(summary, sort_keys=True, default=str))
  print(f'[demo] done: listen to {args.workdir}/original.wav vs reconstruction.wav, '
        f'{args.workdir}/lm_song.wav and lm_melody.wav (+ .png spectrograms), '
        f'{args.workdir}/accomp_mix.wav vs accomp_true.wav; '
        f'`tensorboard --logdir {args.workdir}` for curves.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
