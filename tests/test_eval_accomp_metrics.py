"""Accompaniment metrics on synthetic notes, pulses and chords."""
import numpy as np
import pytest

from musicjax.eval import accomp_metrics as am

SR = 16000
NOTE_SECONDS = 0.4
DECAY = 12.0  # 1/s; notes fade well before the next one starts
AMP = 0.2
C_MAJOR = (60, 64, 67)  # MIDI C4 E4 G4
C_MAJOR_HIGH = (72, 76, 79)  # same pitch classes an octave up
FS_MAJOR = (66, 70, 73)  # F#4 A#4 C#5: no pitch class shared with C major


def _hz(midi):
  return 440.0 * 2.0 ** ((midi - 69) / 12)


def notes(times, seconds, midis=(69,)):
  """Decaying sine chords (one per entry of `times`) in `seconds` of audio."""
  y = np.zeros(int(seconds * SR), np.float32)
  t = np.arange(int(NOTE_SECONDS * SR)) / SR
  tone = sum(np.sin(2 * np.pi * _hz(m) * t) for m in midis)
  tone = AMP * tone * np.exp(-DECAY * t)
  for start in times:
    i = int(round(start * SR))
    n = min(len(tone), len(y) - i)
    y[i:i + n] += tone[:n]
  return y


def chord(midis, seconds=3.0):
  """A sustained chord of sines."""
  t = np.arange(int(seconds * SR)) / SR
  return (AMP * sum(np.sin(2 * np.pi * _hz(m) * t) for m in midis)).astype(
      np.float32)


ONSET_TIMES = np.arange(0.5, 4.5, 0.25)
PULSE_SECONDS = 12.5
BEAT_PERIOD = 0.5  # 120 bpm
PAD_LEVEL = 0.1  # relative level of the sustained pad under the pulse


@pytest.fixture(scope='module')
def pulse():
  """12.5 s of C-major chords on every beat at 120 bpm over a quiet sustained
  C-major pad. The pad keeps every chroma frame audible: silent frames score 0
  even against themselves, so a gappy signal would not reach chroma_sim 1."""
  hits = notes(np.arange(0.25, 12.0, BEAT_PERIOD), PULSE_SECONDS, C_MAJOR)
  return hits + PAD_LEVEL * chord(C_MAJOR, PULSE_SECONDS)


def test_identical_signals_score_perfectly(pulse):
  scores = am.compare(pulse, pulse, SR)
  assert set(scores) == set(am.METRIC_KEYS)
  assert scores['onset_f1'] == 1.0
  assert scores['beat_f1'] == 1.0
  assert scores['chroma_sim'] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize('shift, expected', [(0.03, 1.0), (0.1, 0.0)])
def test_onset_shift_against_window(shift, expected):
  ref = notes(ONSET_TIMES, 5.0)
  est = notes(ONSET_TIMES + shift, 5.0)
  assert am.onset_f1(ref, est, SR, window=0.05) == pytest.approx(
      expected, abs=0.05)


def test_beats_half_a_beat_off_score_low(pulse):
  offbeat = notes(np.arange(0.5, 12.0, BEAT_PERIOD), PULSE_SECONDS, C_MAJOR)
  assert am.beat_f1(pulse, offbeat, SR) < 0.2


def test_silence_scores_zero(pulse):
  silence = np.zeros_like(pulse)
  assert am.chroma_similarity(pulse, silence, SR) == 0.0
  assert am.onset_f1(pulse, silence, SR) == 0.0
  assert am.beat_f1(pulse, silence, SR) == 0.0


def test_inaudible_noise_counts_as_silence():
  ref = chord(C_MAJOR)
  hiss = 1e-5 * np.random.default_rng(0).standard_normal(len(ref))
  assert am.chroma_similarity(ref, hiss, SR) == 0.0


def test_event_rules_when_lists_are_empty():
  silence = np.zeros(SR * 2, np.float32)
  clicks = notes(ONSET_TIMES[:6], 2.0)
  assert am.onset_f1(silence, silence, SR) == 1.0  # both empty: agree
  assert am.onset_f1(silence, clicks, SR) == 0.0
  assert am.onset_f1(clicks, silence, SR) == 0.0
  assert am.beat_f1(silence, silence, SR) == 1.0


def test_chroma_ranks_pitch_content():
  ref = chord(C_MAJOR)
  same_classes = am.chroma_similarity(ref, chord(C_MAJOR_HIGH), SR)
  other_key = am.chroma_similarity(ref, chord(FS_MAJOR), SR)
  assert same_classes > 0.9
  assert other_key < 0.0  # disjoint pitch classes anti-correlate
  assert other_key < same_classes
  assert same_classes > am.chroma_similarity(ref, np.zeros_like(ref), SR)


def test_chroma_trims_to_shorter_signal():
  ref = chord(C_MAJOR)
  # Only the last frames differ (edge padding of the cut signal).
  assert am.chroma_similarity(ref, ref[:5 * SR // 2], SR) == pytest.approx(
      1.0, abs=0.01)


def test_baseline_rows(pulse):
  other = notes(np.arange(0.4, 8.0, 0.6), 8.0, FS_MAJOR)  # shorter: padded
  rows = am.baseline_rows(pulse, pulse, other, SR)
  assert set(rows) == set(am.BASELINE_KEYS)
  for row in rows.values():
    assert set(row) == set(am.METRIC_KEYS)
  assert rows['vocal_copy']['onset_f1'] == 1.0
  assert rows['vocal_copy']['beat_f1'] == 1.0
  assert rows['vocal_copy']['chroma_sim'] == pytest.approx(1.0, abs=1e-5)
  assert rows['silence'] == {'onset_f1': 0.0, 'beat_f1': 0.0,
                             'chroma_sim': 0.0}
  assert rows['other_song']['chroma_sim'] < 0.0


def test_mean_rows_and_table():
  rows = [{'onset_f1': 1.0, 'beat_f1': 0.5, 'chroma_sim': 0.25},
          {'onset_f1': 0.0, 'beat_f1': 0.5, 'chroma_sim': 0.75}]
  mean = am.mean_rows(rows)
  assert mean == {'onset_f1': 0.5, 'beat_f1': 0.5, 'chroma_sim': 0.5}
  table = am.format_table({'model': mean, 'silence': rows[1]})
  lines = table.splitlines()
  assert lines[0] == '| system | onset_f1 | beat_f1 | chroma_sim |'
  assert lines[2] == '| model | 0.500 | 0.500 | 0.500 |'
  assert lines[3] == '| silence | 0.000 | 0.500 | 0.750 |'
  with pytest.raises(ValueError, match='keys'):
    am.mean_rows([rows[0], {'onset_f1': 1.0}])
  with pytest.raises(ValueError, match='no rows'):
    am.mean_rows([])


def test_trailing_channel_axis_is_accepted():
  y = chord(C_MAJOR)
  assert am.chroma_similarity(y[:, None], y, SR) == pytest.approx(
      1.0, abs=1e-5)


@pytest.mark.parametrize('bad, sr, message', [
    (np.zeros((SR, 2), np.float32), SR, 'shape'),
    (np.zeros(0, np.float32), SR, 'empty'),
    (np.full(SR, np.nan, np.float32), SR, 'non-finite'),
    (np.zeros(SR, np.float32), 0, 'sr must be positive'),
])
def test_bad_inputs_raise(bad, sr, message):
  good = np.zeros(SR, np.float32)
  with pytest.raises(ValueError, match=message):
    am.compare(good if sr <= 0 else bad, good, sr)
  with pytest.raises(ValueError, match=message):
    am.compare(good, bad, sr)
