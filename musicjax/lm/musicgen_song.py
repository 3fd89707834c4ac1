"""Songs from a released MusicGen run: a text description -> T5 -> codes
over the delay pattern -> the codec -> wav.

The run is what `musicjax import-musicgen` writes. Generation follows
transformers' MusicGen: the description's T5 tokens (its tokenizer.json,
end-of-sequence token included) are the cross-attention context, the decoder
starts from one slot of pad codes, guidance's unconditional rows have no
valid text (so cross-attention adds nothing), guidance is on the logits,
then top-k (ties kept) and temperature; a song runs to its requested length
(MusicGen has no end token).

A MusicGen-Melody run (config.model.conditioning 'prefix') also takes
--melody: the recording's chroma (musicgen_chroma.py, with the release's
preprocessor_config.json) and the T5 states are the decoder's prefix; as in
transformers, no melody is the null chroma (class 0), guidance's
unconditional rows have the null chroma and zero text states, and no text is
one zero text state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import soundfile as sf

from musicjax import fileio
from musicjax.codec import chunked
from musicjax.errors import UserError
from musicjax.lm import generate as gen
from musicjax.lm import layout
from musicjax.lm import model as model_lib
from musicjax.lm import song
from musicjax.train import runs


def _say(msg: str) -> None:
  print(f'[generate] {msg}', file=sys.stderr, flush=True)


def prompt(m: ml_collections.ConfigDict, tokens: np.ndarray, cfg: bool,
           chroma: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """generate()'s prompt for text tokens [n, T] (padded with -1): one start
  slot per row (every codebook at the pad id) and the text as context; with
  `cfg`, n more rows with no valid text after the conditional ones. A
  MusicGen-Melody run's `chroma` [n, F, chroma_bins] (None: no melody) goes
  with it, guidance's rows holding the null chroma (class 0)."""
  tokens = np.asarray(tokens, np.int64)
  k = int(m.num_codebooks)
  extra = {}
  if chroma is not None:
    chroma = np.asarray(chroma, np.float32)
    if cfg:
      null = np.zeros_like(chroma)
      null[..., 0] = 1.0
      chroma = np.concatenate([chroma, null])
    extra['chroma'] = chroma
  valid = tokens >= 0
  ids = np.where(valid, tokens, 0).astype(np.int32)
  if cfg:
    ids = np.concatenate([ids, ids])
    valid = np.concatenate([valid, np.zeros_like(valid)])
  b = ids.shape[0]
  return {'text': np.full((b, 1), layout.EMPTY, np.int32),
          'audio': np.full((b, 1, k), model_lib.empty_id(m), np.int32),
          'melody': np.full((b, 1), layout.EMPTY, np.int32),
          'positions': np.zeros((b, 1), np.int32),
          'valid': np.ones((b, 1), bool),
          'context_tokens': ids, 'context_valid': valid, **extra}


def load_tokenizer(path: str):
  """The T5 tokenizer (a `tokenizers.Tokenizer`) of tokenizer.json `path`."""
  from tokenizers import Tokenizer
  if not os.path.isfile(path):
    raise UserError(f'{path}: no such file (the T5 tokenizer.json released '
                    'with MusicGen)')
  try:
    return Tokenizer.from_file(path)
  except Exception as err:  # tokenizers raises its own exception types
    raise UserError(f'{path}: not a tokenizers file ({err})') from None


def text_tokens(tokenizer_path: str, text: str) -> np.ndarray:
  """T5 ids [1, T] of `text` as MusicGen's processor gives them (its
  end-of-sequence id last)."""
  return np.asarray([load_tokenizer(tokenizer_path).encode(text).ids],
                    np.int64)


def melody_chroma(workdir: str, m: ml_collections.ConfigDict,
                  path: str) -> np.ndarray:
  """One-hot chroma [1, F, chroma_bins] of the recording `path` (mono, at the
  rate of the run's preprocessor_config.json; other rates resampled)."""
  from musicjax.data import audio
  from musicjax.export import import_musicgen as imp
  from musicjax.lm import musicgen_chroma
  settings = musicgen_chroma.ChromaSettings.from_file(
      os.path.join(workdir, imp.RELEASED, musicgen_chroma.PREPROCESSOR))
  if settings.num_chroma != int(m.chroma_bins):
    raise UserError(f'{workdir}: its {musicgen_chroma.PREPROCESSOR} gives '
                    f'{settings.num_chroma} chroma classes, the model reads '
                    f'{m.chroma_bins}')
  if not os.path.isfile(path):
    raise UserError(f'--melody {path}: no such file')
  try:
    wave = audio.load_audio(path, settings.sampling_rate, 1)[:, 0]
  except audio.BadAudio as err:   # names the file and the reason
    raise UserError(f'--melody {err}') from None
  return musicgen_chroma.chroma(wave, settings)[None]


@dataclasses.dataclass
class MusicGenSong:
  """An imported MusicGen run, its T5 tokenizer and the codec run that
  decodes its codes."""
  run: runs.Run
  tokenizer_path: str
  codec: Any
  codec_workdir: str

  def __post_init__(self):
    m, q = self.run.config.model, self.codec
    if (q.num_codebooks < int(m.num_codebooks)
        or q.codebook_size != int(m.codebook_size)):
      raise UserError(
          f'the codec in {self.codec_workdir} has {q.num_codebooks} x '
          f'{q.codebook_size} codes but the LM in {self.run.workdir} makes '
          f'{m.num_codebooks} x {m.codebook_size}: pass --codec-workdir with '
          "the EnCodec released beside this MusicGen")

  @property
  def config(self):
    return self.run.config

  @property
  def frame_rate(self) -> float:
    return float(self.codec.frame_rate)

  @property
  def sample_rate(self) -> int:
    return int(self.codec.sample_rate)


def check_request(req: song.SongRequest,
                  config: ml_collections.ConfigDict | None = None) -> None:
  """Inputs MusicGen does not take, named by their flags; --melody when the
  run's `config` says it is not a MusicGen-Melody."""
  melody = config is not None and config.model.get('conditioning',
                                                    'cross') != 'prefix'
  for given, flag, why in (
      (req.lyrics, '--lyrics', 'MusicGen takes a description, not lyrics: '
       'put it in --text'),
      (req.melody_path and melody, '--melody',
       'this MusicGen has no melody input (import a MusicGen-Melody folder, '
       'model_type "musicgen_melody", e.g. facebook/musicgen-melody, with '
       'musicjax import-musicgen)'),
      (req.reference_path, '--reference', 'MusicGen has no reference audio')):
    if given:
      raise UserError(f'{flag}: {why}')


def sample_codes(ctx: MusicGenSong, req: song.SongRequest, text: str,
                 progress: bool = True) -> np.ndarray:
  """Codes [frames, K] of one song (one compiled loop)."""
  c = ctx.config
  check_request(req, c)
  k = int(c.model.num_codebooks)
  frames = int(round(req.seconds * ctx.frame_rate))
  if frames < 1:
    raise UserError(f'--seconds {req.seconds} gives no frames at '
                    f'{ctx.frame_rate:g} Hz')
  prefix_mode = c.model.get('conditioning', 'cross') == 'prefix'
  chroma = None
  if req.melody_path:
    chroma = melody_chroma(ctx.run.workdir, c.model, req.melody_path)
  if prefix_mode and not text:
    # transformers' melody-only input: one masked text slot (a zero state).
    tokens = np.full((1, 1), -1, np.int64)
  else:
    tokens = text_tokens(ctx.tokenizer_path, text)
  prefix = (int(c.model.chroma_length) + tokens.shape[1]) if prefix_mode else 0
  if prefix + frames + k > c.model.max_seq_len:
    limit = (c.model.max_seq_len - k - prefix) / ctx.frame_rate
    with_prefix = ' (the chroma and text prefix included)' if prefix else ''
    raise UserError(f'{req.seconds:g} s needs {prefix + frames + k} positions'
                    f'{with_prefix}, more '
                    f'than config.model.max_seq_len={c.model.max_seq_len} '
                    f'(MusicGen\'s max_position_embeddings): at most '
                    f'{limit:.1f} s')
  scale = c.sample.cfg_scale if req.cfg_scale is None else req.cfg_scale
  overrides = {name: getattr(req, name) for name in ('temperature', 'top_k',
                                                     'top_p')
               if getattr(req, name) is not None}
  sampling = gen.sampling_from_config(
      c.sample, cfg_scale=scale, max_frames=frames,
      stream_every=max(1, int(2 * ctx.frame_rate)) if progress else 0,
      **overrides)
  cb = song.FrameProgress(frames, ctx.frame_rate) if progress else None
  fn = gen.make_generate_fn(ctx.run.model, sampling, num_cond=1, callback=cb)
  p = prompt(c.model, tokens, cfg=scale != 1.0, chroma=chroma)
  with ctx.run.activate():
    out = fn({key: jnp.asarray(v) for key, v in p.items()},
             jax.random.key(req.seed))
  return np.asarray(out['codes'])[0, :int(out['num_frames'][0])]


def generate_song(ctx: MusicGenSong, req: song.SongRequest, text: str,
                  out_path: str, progress: bool = True) -> dict[str, Any]:
  """Writes OUT (wav at the codec's rate), OUT.npz (codes) and OUT.png; the
  codes first, so a failed decode keeps the generation; each file whole or
  not at all."""
  t0 = time.perf_counter()
  codes = sample_codes(ctx, req, text, progress)
  t_gen = time.perf_counter() - t0
  base = os.path.splitext(out_path)[0]

  fileio.write_npz(base + '.npz', codes=codes.astype(np.int32),
                   frame_rate=ctx.frame_rate, sample_rate=ctx.sample_rate,
                   request=json.dumps(dict(dataclasses.asdict(req), text=text)))
  t0 = time.perf_counter()
  wave = chunked.decode_array(ctx.codec, codes, progress=progress)
  t_dec = time.perf_counter() - t0
  sr = ctx.sample_rate
  fileio.write_with(out_path, lambda tmp: sf.write(
      tmp, np.clip(wave, -1, 1), sr, format='WAV'))
  fileio.write_with(base + '.png', lambda tmp: song.spectrogram_png(
      wave[:, 0], sr, tmp, f'{text or "(no text)"} | seed {req.seed}'),
      suffix='.png')
  return {'out': out_path, 'frames': int(len(codes)),
          'seconds': len(codes) / ctx.frame_rate, 'sample_rate': sr,
          'generate_seconds': round(t_gen, 2), 'decode_seconds': round(t_dec, 2),
          'tokens': base + '.npz', 'spectrogram': base + '.png',
          'codec': ctx.codec_workdir}


def record_path(workdir: str) -> str:
  from musicjax.export import import_musicgen as imp
  return os.path.join(workdir, imp.RELEASED, imp.RECORD)


def is_released(workdir: str) -> bool:
  """Whether `workdir` was made by import-musicgen (it has the record)."""
  return os.path.isfile(record_path(workdir))


def open_song(workdir: str, config: ml_collections.ConfigDict | None = None,
              codec_workdir: str | None = None, step: int | None = None
              ) -> MusicGenSong:
  """The run `workdir`, its tokenizer, and the codec run `codec_workdir` (or
  the one the import recorded)."""
  path = record_path(workdir)
  try:
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path}: cannot read it ({e}); re-run musicjax '
                    'import-musicgen for this run') from None
  tok = record.get('tokenizer')
  tok = os.path.join(workdir, tok) if tok else ''
  if not tok or not os.path.isfile(tok):
    raise UserError(
        f'{workdir}: no T5 tokenizer.json (the MusicGen folder it was '
        f'imported from had none); copy the release\'s tokenizer.json to '
        f'{os.path.join(os.path.dirname(path), "tokenizer.json")}')
  codec_dir = codec_workdir or record.get('codec') or ''
  if codec_dir and not os.path.isabs(codec_dir) and not codec_workdir:
    codec_dir = os.path.join(workdir, codec_dir)
  if not codec_dir or not os.path.isdir(codec_dir):
    raise UserError(f'{workdir}: no codec to decode with: pass '
                    '--codec-workdir with a codec run of the EnCodec '
                    'released beside this MusicGen')
  codec = runs.load_run(codec_dir, expect='codec',
                        flag='--codec-workdir').model
  run = runs.serving(runs.load_run(workdir, step, config=config,
                                   expect=('lm', 'lm_dpo'), verb='generate'))
  return MusicGenSong(run, tok, codec, codec_dir)
