"""Melody condition: argmax chroma per codec frame."""
import math

import numpy as np
import pytest

from musicjax.data import melody

SR = 16000
HOP = 320  # 50 codec frames per second


def _sine(freq: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
  t = np.arange(int(round(seconds * SR))) / SR
  return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _midi_hz(midi: int) -> float:
  return 440.0 * 2 ** ((midi - 69) / 12)


@pytest.mark.parametrize('midi,cls', [(69, 9), (60, 0), (66, 6), (71, 11)])
def test_single_pitch_gives_its_class(midi, cls):
  tokens = melody.chroma_tokens(_sine(_midi_hz(midi), 1.0), SR, HOP)
  assert tokens.dtype == np.int8
  assert np.mean(tokens == cls) >= 0.95


def test_c_e_g_quarter_notes_in_time():
  quarter = 0.5  # 120 bpm
  x = np.concatenate([_sine(_midi_hz(m), quarter) for m in (60, 64, 67)])
  tokens = melody.chroma_tokens(x, SR, HOP)
  per_note = int(quarter * SR / HOP)  # 25 frames
  assert len(tokens) == 3 * per_note
  for i, cls in enumerate((0, 4, 7)):
    inner = tokens[i * per_note + 1:(i + 1) * per_note - 1]  # 1 frame slack
    assert np.all(inner == cls), (cls, inner)


def test_silence_and_quiet_frames_have_no_melody():
  x = np.concatenate([np.zeros(SR // 2, np.float32), _sine(440.0, 0.5),
                      _sine(440.0, 0.5, amplitude=1e-4)])  # -83 dBFS
  tokens = melody.chroma_tokens(x, SR, HOP)
  assert np.all(tokens[:24] == melody.NO_MELODY)
  assert np.all(tokens[26:49] == 9)
  assert np.all(tokens[51:] == melody.NO_MELODY)
  # A lower threshold lets the quiet tone through.
  loud = melody.chroma_tokens(x, SR, HOP, silence_db=-100.0)
  assert np.all(loud[51:] == 9)
  assert np.all(melody.chroma_tokens(np.zeros(SR), SR, HOP) == melody.NO_MELODY)


@pytest.mark.parametrize('length', [0, 1, 319, 320, 321, 4000, 16000, 16001])
@pytest.mark.parametrize('hop', [160, 320, 1920, 5000])
def test_length_is_ceil(length, hop):
  x = _sine(440.0, 2.0)[:length]
  tokens = melody.chroma_tokens(x, SR, hop, n_fft=2048)
  assert tokens.shape == (math.ceil(length / hop),)
  assert tokens.min(initial=0) >= melody.NO_MELODY
  assert tokens.max(initial=0) < melody.NUM_MELODY_CLASSES


def test_stereo_is_mixed_to_mono():
  left = _sine(_midi_hz(64), 1.0)
  stereo = np.stack([left, 0.8 * left], axis=1)
  tokens = melody.chroma_tokens(stereo, SR, HOP)
  assert tokens.shape == (50,)
  assert np.mean(tokens == 4) >= 0.95
  np.testing.assert_array_equal(
      tokens, melody.chroma_tokens(stereo.mean(axis=1), SR, HOP))
  with pytest.raises(ValueError, match='shape'):
    melody.chroma_tokens(np.zeros((2, 3, 4)), SR, HOP)


def test_last_partial_frame_level_is_not_diluted():
  # 330 samples: the second frame holds 10 samples of the tone; its level must
  # not be lowered by the zero padding up to a whole frame.
  x = _sine(440.0, 330 / SR)
  db = melody.frame_rms_db(x, HOP)
  assert db.shape == (2,)
  assert abs(db[1] - db[0]) < 6.0
