"""`musicjax codec-quality`: a trained codec on real recordings, beside Opus.

For each clip (`seconds` of a file, after an offset that skips intros) the codec
round-trips the clip as it is and a quiet copy scaled to `quiet_dbfs`, and so
does Opus (opusenc/opusdec at its lowest bitrate). Besides mel distance and
SI-SDR (the project's own metrics) each row reports what broke before: the
output level falling away from the input's (the collapse was on quiet input), a
DC offset, and energy piled up below 40 Hz.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
import soundfile as sf

from musicjax import runtime
from musicjax.codec import chunked
from musicjax.data import audio as audio_io
from musicjax.data import augment
from musicjax.data import sources
from musicjax.errors import UserError
from musicjax.eval import audio_metrics
from musicjax.train import runs

LOW_CUTOFF_HZ = 40.0          # "below 40 Hz": rumble and DC, not music
DEFAULT_SECONDS = 10.0
DEFAULT_OFFSET_SECONDS = 10.0  # skip intros (often silence or a fade-in)
DEFAULT_QUIET_DBFS = -30.0
DEFAULT_OPUS_KBPS = 6.0       # Opus's lowest bitrate
OPUS_MIN_KBPS = 6.0
# The only rates an Opus decoder outputs natively.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
OPUS_FALLBACK_RATE = 48000    # other codec rates: decode here, then resample
OPUS_TOOLS = ('opusenc', 'opusdec')
OPUS_INSTALL = 'apt-get install opus-tools'
# Level reported for digital silence, so that every figure stays finite (JSON).
SILENCE_DBFS = augment.SILENCE_DBFS
# Clips quieter than this are skipped: their quiet copy would be amplified noise.
MIN_INPUT_DBFS = -90.0
# Shortest clip measured: the mel distance's longest window must fit in it.
MIN_CLIP_SECONDS = 1.0
NAME_WIDTH = 26               # table column for the clip's name
COPIES = ('as_is', 'quiet')
SYSTEMS = ('codec', 'opus')
# (json key, table header, format, width) of the per-system columns.
_OUT_COLUMNS = (('level_diff_db', 'dLevel dB', '{:+.2f}', 9),
                ('dc', 'out DC', '{:+.5f}', 9),
                ('low_share', 'out<40Hz', '{:.1%}', 8),
                ('mel_distance', 'mel', '{:.3f}', 6),
                ('si_sdr_db', 'SI-SDR dB', '{:.2f}', 9))
_IN_COLUMNS = (('dbfs', 'in dBFS', '{:.2f}', 7),
               ('dc', 'in DC', '{:+.5f}', 9),
               ('low_share', 'in<40Hz', '{:.1%}', 7))
_COPY_WIDTH = 6
_SYSTEM_WIDTH = 6


# ----------------------------------------------------------------- metrics


def rms_dbfs(x: np.ndarray) -> float:
  """20 log10(RMS) over all samples and channels (a full-scale sine: -3.01);
  digital silence gives augment.SILENCE_DBFS rather than -inf."""
  return augment.to_dbfs(augment.rms(x))


def level_difference_db(reference: np.ndarray, estimate: np.ndarray) -> float:
  """Output level minus input level in dB: 0 is right, -6.02 is half."""
  return rms_dbfs(estimate) - rms_dbfs(reference)


def dc_offset(x: np.ndarray) -> float:
  """Mean sample value over time and channels."""
  return float(np.mean(np.asarray(x, np.float64)))


def low_band_share(x: np.ndarray, sample_rate: int,
                   cutoff_hz: float = LOW_CUTOFF_HZ) -> float:
  """Share (0..1) of the energy below `cutoff_hz`, DC included.

  Args:
    x: audio [T] or [T, C].
    sample_rate: its rate in Hz.
    cutoff_hz: the band's upper edge.

  Returns:
    The share over all channels; 0 for silence.
  """
  x = np.asarray(x, np.float64)
  if x.ndim == 1:
    x = x[:, None]
  power = np.square(np.abs(np.fft.rfft(x, axis=0)))
  # One-sided spectrum: every bin but DC (and Nyquist, for even T) stands for
  # two, so the weighted sum is the signal's energy (Parseval).
  weight = np.full(power.shape[0], 2.0)
  weight[0] = 1.0
  if x.shape[0] % 2 == 0:
    weight[-1] = 1.0
  energy = weight[:, None] * power
  total = float(np.sum(energy))
  if total <= 0.0:
    return 0.0
  freqs = np.fft.rfftfreq(x.shape[0], 1.0 / sample_rate)
  return float(np.sum(energy[freqs < cutoff_hz]) / total)


def scale_to_dbfs(x: np.ndarray, dbfs: float) -> np.ndarray:
  """x scaled so that its rms_dbfs is `dbfs` (a quiet copy, for dbfs < 0)."""
  level = rms_dbfs(x)
  if level <= SILENCE_DBFS:
    raise ValueError('scale_to_dbfs: silent input has no level to scale')
  return (np.asarray(x, np.float64) * 10.0 ** ((dbfs - level) / 20.0)).astype(
      np.float32)


def clip_start(file_seconds: float, seconds: float, offset: float) -> float:
  """Where a clip starts: after `offset`, or earlier so that it fits the file."""
  return max(0.0, min(offset, file_seconds - seconds))


def describe_input(x: np.ndarray, sample_rate: int) -> dict[str, float]:
  return dict(dbfs=rms_dbfs(x), dc=dc_offset(x),
              low_share=low_band_share(x, sample_rate))


class Scorer:
  """Output-vs-input figures; mel distance and SI-SDR are musicjax.eval's."""

  def __init__(self, sample_rate: int):
    self.sample_rate = sample_rate
    # jitted once per clip length: all full-length clips share one compile.
    self._mel = jax.jit(functools.partial(audio_metrics.mel_distance,
                                          sample_rate=sample_rate))
    self._si_sdr = jax.jit(audio_metrics.si_sdr)

  def __call__(self, reference: np.ndarray, estimate: np.ndarray) -> dict:
    """reference, estimate [T, C] -> the per-system columns (and output dBFS)."""
    ref, est = reference[None], estimate[None]
    return dict(output_dbfs=rms_dbfs(estimate),
                level_diff_db=level_difference_db(reference, estimate),
                dc=dc_offset(estimate),
                low_share=low_band_share(estimate, self.sample_rate),
                mel_distance=float(self._mel(ref, est)),
                si_sdr_db=float(self._si_sdr(ref, est)))


# -------------------------------------------------------------------- Opus


def check_opus_tools(kbps: float) -> None:
  """UserError unless opusenc and opusdec are on PATH (nothing with kbps 0)."""
  if not kbps:
    return
  missing = [t for t in OPUS_TOOLS if shutil.which(t) is None]
  if missing:
    raise UserError(
        f'--opus-kbps {kbps:g} runs Opus for comparison, but {" and ".join(missing)} '
        f'{"is" if len(missing) == 1 else "are"} not on PATH: install them '
        f'(`{OPUS_INSTALL}`), or pass --opus-kbps 0 to skip Opus')


def opus_version() -> str:
  try:
    out = subprocess.run(['opusenc', '--version'], capture_output=True,
                         text=True, check=False).stdout
  except OSError:
    return ''
  return out.splitlines()[0].strip() if out else ''


def opus_decode_rate(sample_rate: int) -> tuple[int, str]:
  """(rate opusdec decodes at, a note for the result; '' when it is native)."""
  if sample_rate in OPUS_RATES:
    return sample_rate, ''
  return OPUS_FALLBACK_RATE, (
      f'Opus decodes only at {"/".join(str(r // 1000) for r in OPUS_RATES)} kHz, '
      f'not the codec\'s {sample_rate} Hz: decoded at {OPUS_FALLBACK_RATE} Hz '
      f'and resampled to {sample_rate} Hz (soxr)')


def _tool(cmd: list[str], what: str) -> None:
  try:
    subprocess.run(cmd, capture_output=True, text=True, check=True)
  except subprocess.CalledProcessError as e:
    tail = (e.stderr or e.stdout or '').strip().splitlines()[-3:]
    raise UserError(f'{cmd[0]} failed on {what} (exit {e.returncode}): '
                    f'{" / ".join(tail)}; check --opus-kbps, or pass '
                    '--opus-kbps 0 to skip Opus') from None


def opus_roundtrip(x: np.ndarray, sample_rate: int, kbps: float,
                   tmpdir: str, what: str = 'a clip') -> tuple[np.ndarray, float]:
  """x [T, C] through opusenc/opusdec -> (y [T, C] at sample_rate, file kbps).

  The file bitrate counts the whole .opus file (Ogg pages and headers too).
  """
  wav_in = os.path.join(tmpdir, 'in.wav')
  packed = os.path.join(tmpdir, 'clip.opus')
  wav_out = os.path.join(tmpdir, 'out.wav')
  # Float WAV in and out: no 16-bit quantisation or dither on quiet copies.
  sf.write(wav_in, x, sample_rate, subtype='FLOAT')
  _tool(['opusenc', '--quiet', '--bitrate', f'{kbps:g}', wav_in, packed], what)
  rate, _ = opus_decode_rate(sample_rate)
  _tool(['opusdec', '--quiet', '--float', '--rate', str(rate), packed, wav_out],
        what)
  y, got_rate = sf.read(wav_out, dtype='float32', always_2d=True)
  y = audio_io.convert_channels(audio_io.resample(y, got_rate, sample_rate),
                                x.shape[1])
  y = _fit(y, x.shape[0])
  file_kbps = os.path.getsize(packed) * 8 / (x.shape[0] / sample_rate) / 1000
  return y, file_kbps


def _fit(y: np.ndarray, frames: int) -> np.ndarray:
  """y trimmed, or zero-padded at the end, to `frames` frames."""
  if y.shape[0] >= frames:
    return y[:frames]
  return np.pad(y, ((0, frames - y.shape[0]), (0, 0)))


# -------------------------------------------------------------------- clips


def find_files(paths: list[str]) -> list[tuple[str, str]]:
  """(path, display name) of every audio file under `paths`, in order."""
  found, seen = [], set()
  for p in paths:
    if os.path.isdir(p):
      entries = [(f, os.path.relpath(f, p)) for f in sources.list_audio_files(p)]
    elif os.path.isfile(p):
      entries = [(p, os.path.basename(p))]
    else:
      raise UserError(f'--audio {p}: no such file or directory; pass audio '
                      'files or folders of them (.wav/.flac/.ogg/.mp3)')
    for f, name in entries:
      key = os.path.realpath(f)
      if key not in seen:
        seen.add(key)
        found.append((f, name))
  if not found:
    raise UserError(f'--audio {" ".join(paths)}: no audio files (.wav, .flac, '
                    '.ogg, .mp3) there; pass files or folders that hold some')
  return found


def _load_clip(path: str, sample_rate: int, channels: int, seconds: float,
               offset: float) -> tuple[np.ndarray | None, float, str]:
  """(clip or None, start seconds, why it was skipped)."""
  try:
    info = audio_io.audio_info(path)
    if info.seconds < MIN_CLIP_SECONDS:
      return None, 0.0, f'shorter than {MIN_CLIP_SECONDS:g} s ({info.seconds:.2f} s)'
    start = clip_start(info.seconds, seconds, offset)
    x = audio_io.load_audio(path, sample_rate, channels, start_seconds=start,
                            duration_seconds=min(seconds, info.seconds - start))
  except audio_io.BadAudio as e:
    return None, 0.0, str(e)
  if rms_dbfs(x) < MIN_INPUT_DBFS:
    return None, start, f'silent (below {MIN_INPUT_DBFS:g} dBFS)'
  return x, start, ''


# --------------------------------------------------------------------- run


def host_info() -> dict[str, Any]:
  """CPU model, 1-minute load average and JAX device: context for timings."""
  device = jax.devices()[0]
  return dict(cpu_model=runtime.cpu_model(), cpu_count=os.cpu_count(),
              load_avg_1m=runtime.load_now(),
              jax_device=f'{device.platform}:{device.device_kind}')


def _check_flags(seconds, clips, quiet_dbfs, opus_kbps, offset) -> None:
  if not seconds >= MIN_CLIP_SECONDS:
    raise UserError(f'--seconds must be at least {MIN_CLIP_SECONDS:g}, got {seconds:g}')
  if clips < 0:
    raise UserError(f'--clips must be 0 (all files) or more, got {clips}')
  if not MIN_INPUT_DBFS <= quiet_dbfs < 0:
    raise UserError(f'--quiet-dbfs must be below 0 and at least {MIN_INPUT_DBFS:g} '
                    f'(dBFS RMS of the quiet copy, e.g. -30), got {quiet_dbfs:g}')
  if opus_kbps and opus_kbps < OPUS_MIN_KBPS:
    raise UserError(f'--opus-kbps must be 0 (no Opus) or at least '
                    f'{OPUS_MIN_KBPS:g} (its lowest bitrate), got {opus_kbps:g}')
  if offset < 0:
    raise UserError(f'--offset must be 0 or more seconds, got {offset:g}')


def run(workdir: str, audio: list[str], *, seconds: float = DEFAULT_SECONDS,
        clips: int = 0, quiet_dbfs: float = DEFAULT_QUIET_DBFS,
        opus_kbps: float = DEFAULT_OPUS_KBPS,
        offset: float = DEFAULT_OFFSET_SECONDS,
        progress: bool = True) -> dict[str, Any]:
  """Measures the codec in `workdir` (and Opus) on clips of the `audio` files.

  Args:
    workdir: a trained codec run.
    audio: audio files and folders (searched recursively).
    seconds: clip length; shorter files give their whole length.
    clips: at most this many clips (0: one per file).
    quiet_dbfs: level of each clip's quiet copy (dBFS RMS).
    opus_kbps: Opus target bitrate; 0 skips Opus.
    offset: seconds skipped at the start of a file long enough for it.
    progress: print a line per file to stderr.

  Returns:
    The result: codec/opus/host facts, a row per clip and copy, means.

  Raises:
    UserError: a bad flag, a workdir that is no trained codec, no audio, or no
      opusenc/opusdec with opus_kbps > 0.
  """
  _check_flags(seconds, clips, quiet_dbfs, opus_kbps, offset)
  check_opus_tools(opus_kbps)
  files = find_files(list(audio))
  host = host_info()
  codec_run = runs.load_run(workdir, expect='codec', verb='codec-quality')
  config, model, step = codec_run.config, codec_run.model, codec_run.step
  sr, channels = int(config.data.sample_rate), int(config.data.channels)
  codec = dict(workdir=workdir, step=step, sample_rate=sr, channels=channels,
               num_codebooks=int(model.num_codebooks),
               codebook_size=int(model.codebook_size),
               frame_rate=float(model.frame_rate),
               kbps=audio_metrics.bitrate(model.num_codebooks, model.codebook_size,
                                          model.frame_rate) / 1000)
  opus = None
  if opus_kbps:
    decode_rate, note = opus_decode_rate(sr)
    opus = dict(kbps=float(opus_kbps), version=opus_version(),
                decode_rate=decode_rate, note=note)
  score = Scorer(sr)
  target = min(clips, len(files)) if clips else len(files)
  rows, skipped, file_kbps = [], [], []

  def say(text):
    if progress:
      print(text, file=sys.stderr, flush=True)

  with tempfile.TemporaryDirectory(prefix='musicjax-codec-quality-') as tmp:
    for index, (path, name) in enumerate(files, 1):
      if len(rows) // len(COPIES) >= target:
        break
      tag = f'[{index}/{len(files)}]'
      x, start, why = _load_clip(path, sr, channels, seconds, offset)
      if x is None:
        skipped.append(dict(file=path, reason=why))
        say(f'{tag} skipping {name}: {why}')
        continue
      clip_seconds = x.shape[0] / sr
      say(f'{tag} {name} {start:.1f}-{start + clip_seconds:.1f} s ...')
      for copy in COPIES:
        inp = x if copy == 'as_is' else scale_to_dbfs(x, quiet_dbfs)
        t0 = time.perf_counter()
        codes = chunked.encode_array(model, inp, progress=False)
        y = chunked.decode_array(  # at the input's level (model.normalize)
            model, codes, scales=chunked.frame_scales(model, inp),
            progress=False)[:inp.shape[0]]
        codec_wall = time.perf_counter() - t0  # the first clip's includes compiling
        row = dict(clip=name, file=path, start_seconds=start,
                   seconds=clip_seconds, copy=copy,
                   input=describe_input(inp, sr),
                   codec=score(inp, np.asarray(y, np.float32)))
        row['codec']['wall_seconds'] = codec_wall
        if opus is not None:
          t0 = time.perf_counter()
          z, kbps = opus_roundtrip(inp, sr, opus_kbps, tmp, what=path)
          opus_wall = time.perf_counter() - t0
          row['opus'] = score(inp, z)
          row['opus'].update(file_kbps=kbps, wall_seconds=opus_wall)
          file_kbps.append(kbps)
        rows.append(row)
      say(f'{tag} {name}: ' + ', '.join(
          f'{copy} codec {r["codec"]["level_diff_db"]:+.1f} dB / SI-SDR '
          f'{r["codec"]["si_sdr_db"]:.1f}' for copy, r in zip(COPIES, rows[-len(COPIES):])))
  if not rows:
    raise UserError(f'--audio {" ".join(audio)}: no file gave a clip to measure '
                    f'({len(skipped)} skipped: ' + '; '.join(
                        f'{s["file"]}: {s["reason"]}' for s in skipped[:3]) + ')')
  if opus is not None:
    opus['file_kbps_mean'] = float(np.mean(file_kbps))
  host['load_avg_1m_end'] = host_info()['load_avg_1m']
  return dict(codec=codec, opus=opus, host=host,
              settings=dict(seconds=seconds, offset=offset, clips=clips,
                            quiet_dbfs=quiet_dbfs, opus_kbps=opus_kbps,
                            low_cutoff_hz=LOW_CUTOFF_HZ),
              rows=rows, means=means(rows), skipped=skipped)


def means(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
  """{copy: {'input'|system: {metric: mean over clips}}}."""
  out = {}
  for copy in COPIES:
    mine = [r for r in rows if r['copy'] == copy]
    if not mine:
      continue
    out[copy] = {}
    for part in ('input',) + SYSTEMS:
      if part not in mine[0] or mine[0][part] is None:
        continue
      keys = mine[0][part].keys()
      out[copy][part] = {k: float(np.mean([r[part][k] for r in mine]))
                         for k in keys}
  return out


# ------------------------------------------------------------------ output


def _line(name: str, copy: str, inp: dict | None, system: str,
          out: dict) -> str:
  cells = [name[:NAME_WIDTH].ljust(NAME_WIDTH), copy.ljust(_COPY_WIDTH)]
  for key, _, fmt, width in _IN_COLUMNS:
    cells.append(fmt.format(inp[key]).rjust(width) if inp else ' ' * width)
  cells.append(system.ljust(_SYSTEM_WIDTH))
  cells += [fmt.format(out[key]).rjust(width)
            for key, _, fmt, width in _OUT_COLUMNS]
  return '  '.join(cells).rstrip()


def format_table(result: dict) -> str:
  """The result as text: bitrates, then a block per clip, then the means."""
  c, o = result['codec'], result['opus']
  lines = [f'codec  {c["workdir"]} (step {c["step"]}): {c["sample_rate"]} Hz, '
           f'{c["channels"]} ch, {c["num_codebooks"]} x {c["codebook_size"]} codes '
           f'at {c["frame_rate"]:g} Hz = {c["kbps"]:.2f} kbps']
  if o:
    lines.append(f'opus   --bitrate {o["kbps"]:g} kbps (file incl. Ogg: '
                 f'{o["file_kbps_mean"]:.2f} kbps), decoded at {o["decode_rate"]} '
                 f'Hz [{o["version"]}]' + (f'; {o["note"]}' if o['note'] else ''))
  else:
    lines.append('opus   skipped (--opus-kbps 0)')
  s = result['settings']
  lines.append(f'clips  {s["seconds"]:g} s from {s["offset"]:g} s in; quiet copy '
               f'at {s["quiet_dbfs"]:g} dBFS; <40Hz = share of energy below '
               f'{s["low_cutoff_hz"]:g} Hz; dLevel = output minus input level')
  header = ['clip'.ljust(NAME_WIDTH), 'copy'.ljust(_COPY_WIDTH)]
  header += [h.rjust(w) for _, h, _, w in _IN_COLUMNS]
  header += ['system'.ljust(_SYSTEM_WIDTH)]
  header += [h.rjust(w) for _, h, _, w in _OUT_COLUMNS]
  header_line = '  '.join(header)
  lines += ['', header_line, '-' * len(header_line)]
  systems = [sy for sy in SYSTEMS if o or sy == 'codec']
  blocks = [(r['clip'], r['copy'], r['input'], r) for r in result['rows']]
  blocks += [('MEAN', copy, m['input'], m) for copy, m in result['means'].items()]
  last = None
  for name, copy, inp, row in blocks:
    if name == 'MEAN' and last != 'MEAN':
      lines.append('-' * len(header_line))
    for i, system in enumerate(systems):
      shown = name if name != last else ''
      lines.append(_line(shown, copy if i == 0 else '', inp if i == 0 else None,
                         system, row[system]))
      last = name
  for sk in result['skipped']:
    lines.append(f'skipped {sk["file"]}: {sk["reason"]}')
  h = result['host']
  load = '/'.join('?' if v is None else f'{v:.2f}'
                  for v in (h['load_avg_1m'], h['load_avg_1m_end']))
  lines.append(f'host   {h["cpu_model"]} ({h["cpu_count"]} cpus), 1-min load '
               f'{load} (start/end), {h["jax_device"]}')
  return '\n'.join(lines)


def main(workdir: str, audio: list[str], *, json_path: str | None = None,
         **kwargs) -> dict[str, Any]:
  """`musicjax codec-quality`: run, print the table, write --json."""
  if json_path:
    parent = os.path.dirname(os.path.abspath(json_path))
    if not os.path.isdir(parent):
      raise UserError(f'--json {json_path}: folder {parent} does not exist; '
                      'create it or write the JSON elsewhere')
  result = run(workdir, audio, **kwargs)
  print(format_table(result), flush=True)
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(result, f, indent=1)
  return result
