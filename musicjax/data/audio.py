"""Audio decoding, resampling, channel conversion and bad-file reporting.

Every file that cannot be used is reported once per process through
`report_bad` (one log line naming the path and the reason) and counted, so the
trainer can log `bad_file_count()` as `data/bad_files`. Nothing bad is dropped
silently, and no bad file crashes a run.
"""
from __future__ import annotations

import atexit
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from typing import BinaryIO

import librosa
import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger('musicjax.data')

AUDIO_EXTENSIONS = ('.wav', '.flac', '.ogg', '.mp3')
# Subtypes that can hold NaN/Inf; integer PCM and lossy codecs cannot.
_FLOAT_SUBTYPES = ('FLOAT', 'DOUBLE')
# Frames per block when checking a float file for NaN/Inf without loading it whole.
_SCAN_BLOCK_FRAMES = 1 << 20
# The upfront scan reads this many frames at the end of each file (truncation).
_TAIL_CHECK_FRAMES = 1024

_bad_lock = threading.Lock()
_bad: dict[str, str] = {}


class BadAudio(Exception):
  """A file (or record) that cannot be used, with the reason."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = path
    self.reason = reason


# Grain worker processes report into files under this directory (inherited
# through the environment), so the main process counts what they found too.
SHARED_REPORT_ENV = 'MUSICJAX_BAD_FILE_DIR'


def share_reports_with_workers() -> str:
  """Makes reports from child processes (Grain workers) visible here; call
  before starting them. Returns the shared directory."""
  d = os.environ.get(SHARED_REPORT_ENV)
  if not d or not os.path.isdir(d):
    d = tempfile.mkdtemp(prefix='musicjax-bad-files-')
    os.environ[SHARED_REPORT_ENV] = d
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(d, True))
  return d


def report_bad(path: str, reason: str) -> None:
  """Logs one warning per path and counts it (per process; see below)."""
  with _bad_lock:
    if path in _bad:
      return
    _bad[path] = reason
  logger.warning('musicjax: skipping bad audio file %s: %s', path, reason)
  shared = os.environ.get(SHARED_REPORT_ENV)
  if shared and os.path.isdir(shared):
    line = json.dumps([path, reason]) + '\n'
    with open(os.path.join(shared, f'{os.getpid()}.jsonl'), 'a') as f:
      f.write(line)  # one short append per bad file: atomic enough on POSIX


def bad_files() -> dict[str, str]:
  """Every bad file reported in this process or in its Grain workers."""
  with _bad_lock:
    out = dict(_bad)
  shared = os.environ.get(SHARED_REPORT_ENV)
  if shared and os.path.isdir(shared):
    for name in sorted(os.listdir(shared)):
      try:
        with open(os.path.join(shared, name)) as f:
          for line in f:
            try:
              path, reason = json.loads(line)
            except ValueError:
              continue  # a line being written right now
            out.setdefault(path, reason)
      except OSError:
        continue
  return out


def bad_file_count() -> int:
  return len(bad_files())


def reset_bad_files() -> None:
  """Forgets all reports (tests, and a fresh run in the same process)."""
  with _bad_lock:
    _bad.clear()
  shared = os.environ.get(SHARED_REPORT_ENV)
  if shared and os.path.isdir(shared):
    for name in os.listdir(shared):
      try:
        os.remove(os.path.join(shared, name))
      except OSError:
        pass


@dataclasses.dataclass(frozen=True)
class AudioInfo:
  sample_rate: int
  frames: int
  channels: int
  subtype: str

  @property
  def seconds(self) -> float:
    return self.frames / self.sample_rate


Source = str | bytes


def _open(source: Source) -> str | BinaryIO:
  return io.BytesIO(source) if isinstance(source, bytes) else source


def audio_info(source: Source, name: str | None = None) -> AudioInfo:
  """Header facts of a file or in-memory encoded bytes; BadAudio if unusable."""
  name = name or (source if isinstance(source, str) else '<bytes>')
  if isinstance(source, str):
    if not os.path.isfile(source):
      raise BadAudio(name, 'file not found')
    if os.path.getsize(source) == 0:
      raise BadAudio(name, 'empty file (0 bytes)')
  elif not source:
    raise BadAudio(name, 'empty record (0 bytes)')
  try:
    info = sf.info(_open(source))
  except Exception as e:  # libsndfile raises several types for bad headers
    raise BadAudio(name, f'undecodable or corrupt ({_short(e)})') from None
  if info.frames <= 0 or info.samplerate <= 0:
    raise BadAudio(name, 'zero-length audio (0 frames)')
  if info.channels <= 0:
    raise BadAudio(name, 'no audio channels')
  return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels),
                   str(info.subtype))


def check_file(source: Source, *, min_seconds: float = 0.0,
               max_seconds: float | None = None,
               name: str | None = None) -> AudioInfo:
  """Cheap upfront check: header, length limits, the end of the audio is
  readable, and NaN/Inf for float files."""
  name = name or (source if isinstance(source, str) else '<bytes>')
  info = audio_info(source, name)
  _check_tail(source, name, info)
  if max_seconds is not None and max_seconds > 0 and info.seconds > max_seconds:
    raise BadAudio(name, f'too long: {info.seconds:.1f} s > max_file_seconds '
                   f'{max_seconds:g} s')
  if info.seconds < min_seconds:
    raise BadAudio(name, f'shorter than a segment: {info.seconds:.3f} s < '
                   f'{min_seconds:g} s')
  if info.subtype in _FLOAT_SUBTYPES:
    try:
      with sf.SoundFile(_open(source)) as f:
        for block in f.blocks(blocksize=_SCAN_BLOCK_FRAMES, dtype='float32'):
          if not np.all(np.isfinite(block)):
            raise BadAudio(name, 'contains NaN or Inf samples')
    except BadAudio:
      raise
    except Exception as e:
      raise BadAudio(name, f'undecodable or corrupt ({_short(e)})') from None
  return info


def _check_tail(source: Source, name: str, info: AudioInfo) -> None:
  """Reads the last frames the header promises: a truncated FLAC or MP3 keeps
  its full-length header, and would otherwise pass the scan and fail later,
  when a pipeline reads it (maybe never named, in an eval split not used)."""
  want = min(info.frames, _TAIL_CHECK_FRAMES)
  try:
    with sf.SoundFile(_open(source)) as f:
      f.seek(info.frames - want)
      got = f.read(want, dtype='float32').shape[0]
  except Exception as e:  # libsndfile raises several types for damaged data
    raise BadAudio(name, f'truncated or corrupt: the header promises '
                   f'{info.frames} frames, reading its end failed '
                   f'({_short(e)})') from None
  if got < want:
    raise BadAudio(name, f'truncated: the header promises {info.frames} frames, '
                   f'the data ends before frame {info.frames - want + got}')


def _short(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:200] if text else type(e).__name__


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
  """[T, C_in] -> [T, channels]: mono mixdown, or repeat/trim channels."""
  if x.shape[1] == channels:
    return x
  if channels == 1:
    return x.mean(axis=1, keepdims=True)
  if x.shape[1] == 1:
    return np.repeat(x, channels, axis=1)
  # e.g. 5.1 -> stereo: downmix to mono first, then duplicate (no layout guess).
  return np.repeat(x.mean(axis=1, keepdims=True), channels, axis=1)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
  if sr_in == sr_out:
    return x
  return soxr.resample(x, sr_in, sr_out).astype(np.float32, copy=False)


def _decode(source: Source, name: str, start: int, frames: int) -> tuple[np.ndarray, int]:
  try:
    with sf.SoundFile(_open(source)) as f:
      if start:
        f.seek(start)
      x = f.read(frames, dtype='float32', always_2d=True)
      return x, int(f.samplerate)
  except Exception as e:
    if isinstance(source, str) and source.lower().endswith('.mp3'):
      return _decode_fallback(source, name, start, frames)
    raise BadAudio(name, f'undecodable or corrupt ({_short(e)})') from None


def _decode_fallback(path: str, name: str, start: int, frames: int):
  """librosa/audioread for mp3 files an older libsndfile cannot read."""
  try:
    y, sr = librosa.load(path, sr=None, mono=False)
  except Exception as e:
    raise BadAudio(name, f'undecodable or corrupt ({_short(e)})') from None
  y = np.atleast_2d(y).T.astype(np.float32)
  stop = None if frames < 0 else start + frames
  return y[start:stop], int(sr)


def load_audio(source: Source, sample_rate: int, channels: int,
               max_seconds: float | None = None, *, start_seconds: float = 0.0,
               duration_seconds: float | None = None,
               name: str | None = None) -> np.ndarray:
  """Decodes (a window of) a file to float32 [T, channels] at `sample_rate`.

  Args:
    source: a path, or the encoded bytes of a file (wav/flac/ogg/mp3).
    sample_rate: output rate; other rates are resampled with soxr.
    channels: output channels (mono mixdown or duplication).
    max_seconds: files longer than this are BadAudio (None/0: no limit).
    start_seconds: where to start reading, in the file's own time.
    duration_seconds: how much to read (None: to the end). Only this window is
      decoded, so a 1 s crop of a long file stays cheap.
    name: the path to name in errors when `source` is bytes.

  Raises:
    BadAudio: undecodable, empty, too long, or NaN/Inf in the decoded window.
  """
  name = name or (source if isinstance(source, str) else '<bytes>')
  info = audio_info(source, name)
  if max_seconds and info.seconds > max_seconds:
    raise BadAudio(name, f'too long: {info.seconds:.1f} s > max_file_seconds '
                   f'{max_seconds:g} s')
  start = min(int(round(start_seconds * info.sample_rate)), info.frames)
  frames = -1
  if duration_seconds is not None:
    frames = int(math.ceil(duration_seconds * info.sample_rate))
  x, sr_in = _decode(source, name, start, frames)
  if x.shape[0] == 0:
    raise BadAudio(name, 'zero-length audio (no frames decoded)')
  if not np.all(np.isfinite(x)):
    raise BadAudio(name, 'contains NaN or Inf samples')
  x = convert_channels(x, channels)
  return np.ascontiguousarray(resample(x, sr_in, sample_rate), dtype=np.float32)


def fit_length(x: np.ndarray, frames: int, name: str,
               tolerance: int) -> np.ndarray:
  """Trims to `frames`, padding at most `tolerance` frames lost to resampling."""
  if x.shape[0] >= frames:
    return x[:frames]
  if frames - x.shape[0] > tolerance:
    raise BadAudio(name, f'shorter than a segment: {x.shape[0]} < {frames} '
                   'frames after resampling')
  pad = np.zeros((frames - x.shape[0], x.shape[1]), np.float32)
  return np.concatenate([x, pad], axis=0)


def encode_flac(x: np.ndarray, sample_rate: int) -> bytes:
  """float32 [T, C] -> FLAC bytes (16-bit)."""
  buf = io.BytesIO()
  sf.write(buf, np.clip(x, -1.0, 1.0), sample_rate, format='FLAC',
           subtype='PCM_16')
  return buf.getvalue()
