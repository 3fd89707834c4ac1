"""Error messages a user sees for common mistakes (issue 15, item 4): a file
that is not a codes file, a run of the wrong kind, a misspelled config key.

Every case fails before any model is built or restored, so a workdir holding
only a config.json is enough and each test takes well under a second.
"""
import os
import zipfile

import numpy as np
import pytest

from musicjax import cli
from musicjax import config as config_lib
from musicjax.codec import chunked
from musicjax.data import token_records
from musicjax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'codec', 'tiny.py')


def _run_dir(tmp_path, family: str, name: str = 'run') -> str:
  """A workdir with only the config.json that training configs/FAMILY/tiny.py saves."""
  wd = str(tmp_path / name)
  config_lib.save(config_lib.load(os.path.join(ROOT, 'configs', family, 'tiny.py')),
                  wd)
  return wd


def _err(capsys) -> str:
  return capsys.readouterr().err


# --- 1. `musicjax decode` given something that is not a codes file ----------


def _decode(wd, path, tmp_path):
  return cli.main(['decode', '--workdir', wd, str(path), str(tmp_path / 'o.wav')])


def _assert_not_codes_message(err, path):
  assert f'{path} is not a musicjax codes file' in err, err
  assert 'allow_pickle' not in err and 'pickled' not in err, err
  # What was expected, and how to make one.
  assert "'codes'" in err and chunked.CODES_FORMAT in err, err
  assert 'musicjax encode' in err, err


def test_decode_npz_with_an_object_array_never_suggests_unpickling(tmp_path, capsys):
  wd = _run_dir(tmp_path, 'codec')
  objects = np.array([{'a': 1}, None], dtype=object)
  only = tmp_path / 'only_objects.npz'
  np.savez(only, codes=objects)
  assert _decode(wd, only, tmp_path) == 2
  _assert_not_codes_message(_err(capsys), only)
  # Every array a codes file has, but 'codes' is a pickled object array.
  path = tmp_path / 'objects.npz'
  np.savez(path, codes=objects, format=chunked.CODES_FORMAT, sample_rate=8000,
           num_samples=64, hop_length=16, codebook_size=32)
  assert _decode(wd, path, tmp_path) == 2
  err = _err(capsys)
  _assert_not_codes_message(err, path)
  assert "'codes' array holds Python objects" in err, err
  assert not (tmp_path / 'o.wav').exists()


def test_decode_npz_with_other_array_names(tmp_path, capsys):
  wd = _run_dir(tmp_path, 'codec')
  path = tmp_path / 'other.npz'
  np.savez(path, x=np.zeros(3), y=np.ones(2))
  assert _decode(wd, path, tmp_path) == 2
  err = _err(capsys)
  _assert_not_codes_message(err, path)
  assert "'x'" in err and "'y'" in err, err  # what the file does hold


def test_decode_npz_with_wrong_dtype_or_shape(tmp_path, capsys):
  wd = _run_dir(tmp_path, 'codec')
  meta = dict(format=chunked.CODES_FORMAT, sample_rate=8000, channels=1,
              num_samples=64, hop_length=16, frame_rate=500.0, n_q=2,
              codebook_size=32)
  floats = tmp_path / 'floats.npz'
  np.savez(floats, codes=np.zeros((4, 2), np.float32), **meta)
  assert _decode(wd, floats, tmp_path) == 2
  err = _err(capsys)
  _assert_not_codes_message(err, floats)
  assert 'float32' in err, err
  flat = tmp_path / 'flat.npz'
  np.savez(flat, codes=np.zeros(8, np.int16), **meta)
  assert _decode(wd, flat, tmp_path) == 2
  err = _err(capsys)
  _assert_not_codes_message(err, flat)
  assert '(8,)' in err, err


def test_decode_file_that_is_not_an_npz(tmp_path, capsys):
  wd = _run_dir(tmp_path, 'codec')
  # np.load would try to unpickle this and name allow_pickle in its error.
  path = tmp_path / 'song.npz'
  path.write_bytes(b'RIFF....WAVEfmt not codes at all')
  assert _decode(wd, path, tmp_path) == 2
  _assert_not_codes_message(_err(capsys), path)
  # A zip with bytes before it: zipfile reads it, np.load tries to unpickle it.
  plain = tmp_path / 'plain.zip'
  with zipfile.ZipFile(plain, 'w') as z:
    z.writestr('notes.txt', 'hello')
  prefixed = tmp_path / 'prefixed.npz'
  prefixed.write_bytes(b'JUNK' + plain.read_bytes())
  assert _decode(wd, prefixed, tmp_path) == 2
  _assert_not_codes_message(_err(capsys), prefixed)


def test_decode_truncated_and_corrupt_npz(tmp_path, capsys):
  wd = _run_dir(tmp_path, 'codec')
  good = tmp_path / 'good.npz'
  np.savez(good, codes=np.zeros((64, 2), np.int16), format=chunked.CODES_FORMAT,
           sample_rate=8000, num_samples=1024, hop_length=16, codebook_size=32)
  raw = good.read_bytes()
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(raw[:len(raw) // 2])
  assert _decode(wd, truncated, tmp_path) == 2
  err = _err(capsys)
  _assert_not_codes_message(err, truncated)
  assert 'truncated' in err, err
  # A member whose bytes are damaged (the zip directory is intact).
  corrupt = tmp_path / 'corrupt.npz'
  with zipfile.ZipFile(good) as z:
    info = z.getinfo('codes.npy')
  damaged = bytearray(raw)
  # The local header is 30 bytes + name + extra field (its length at byte 28);
  # +150 skips the 128-byte .npy header into the array data.
  extra = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30],
                         'little')
  at = info.header_offset + 30 + len(info.filename) + extra + 150
  damaged[at:at + 8] = bytes(255 - b for b in damaged[at:at + 8])
  corrupt.write_bytes(bytes(damaged))
  assert _decode(wd, corrupt, tmp_path) == 2
  err = _err(capsys)
  _assert_not_codes_message(err, corrupt)
  assert 'corrupt' in err, err


def test_decode_missing_file(tmp_path, capsys):
  wd = _run_dir(tmp_path, 'codec')
  path = tmp_path / 'nowhere.npz'
  assert _decode(wd, path, tmp_path) == 2
  err = _err(capsys)
  assert f'codes file not found: {path}' in err, err
  assert 'musicjax encode' in err, err


def test_load_codes_accepts_what_encode_writes(tmp_path):
  path = tmp_path / 'c.npz'
  codes = np.arange(12, dtype=np.int16).reshape(6, 2)
  np.savez_compressed(path, codes=codes, format=chunked.CODES_FORMAT,
                      sample_rate=8000, channels=1, num_samples=90,
                      hop_length=16, frame_rate=500.0, n_q=2, codebook_size=32,
                      source='a.wav', musicjax_version='0')
  data = chunked.load_codes(str(path))
  np.testing.assert_array_equal(data['codes'], codes)
  assert int(data['num_samples']) == 90


# --- 2. a run of the wrong kind ----------------------------------------------


def test_generate_on_a_codec_run_names_both_kinds(tmp_path, capsys):
  wd = _run_dir(tmp_path, 'codec', 'x')
  out = tmp_path / 'song.wav'
  assert cli.main(['generate', '--workdir', wd, '--out', str(out)]) == 2
  err = _err(capsys)
  assert f'{wd} is a codec run' in err, err
  assert 'an LM run' in err and 'configs/lm/' in err, err
  assert "''" not in err and 'dataset.json' not in err, err
  assert not out.exists()
  # An LM run passes the check: what fails next is its missing checkpoint.
  lm = _run_dir(tmp_path, 'lm')
  assert cli.main(['generate', '--workdir', lm, '--out', str(out)]) == 2
  err = _err(capsys)
  assert 'checkpoint' in err and 'is an LM run' not in err, err


def test_accompany_on_a_codec_or_lm_run_names_both_kinds(tmp_path, capsys):
  for task, kind in (('codec', 'a codec run'), ('lm', 'an LM run')):
    wd = _run_dir(tmp_path, task, task)
    assert cli.main(['accompany', '--workdir', wd, '--vocal', 'v.wav', '--out',
                     str(tmp_path / 'mix.wav'), '--stem',
                     str(tmp_path / 'stem.wav')]) == 2
    err = _err(capsys)
    assert f'{wd} is {kind}' in err, err
    assert 'an accompaniment run' in err and 'configs/accomp/' in err, err
    assert "''" not in err, err


def test_prefs_on_an_accomp_run(tmp_path, capsys):
  wd = _run_dir(tmp_path, 'accomp')
  assert cli.main(['prefs', '--workdir', wd, '--out',
                   str(tmp_path / 'pairs.jsonl')]) == 2
  err = _err(capsys)
  assert f'{wd} is an accompaniment run' in err and 'an LM run' in err, err


@pytest.mark.parametrize('verb', ['encode', 'decode'])
def test_encode_decode_on_an_lm_run(tmp_path, capsys, verb):
  wd = _run_dir(tmp_path, 'lm')
  src = tmp_path / 'in.file'
  src.write_bytes(b'x')
  assert cli.main([verb, '--workdir', wd, str(src), str(tmp_path / 'out')]) == 2
  err = _err(capsys)
  assert f'{wd} is an LM run' in err and 'a codec run' in err, err
  assert 'configs/codec/' in err, err


def test_config_of_another_task_than_the_run(tmp_path, capsys):
  wd = _run_dir(tmp_path, 'lm')
  assert cli.main(['eval', '--workdir', wd, '--config', TINY]) == 2
  err = _err(capsys)
  assert f'{wd} is an LM run' in err and TINY in err and "'codec'" in err, err


def test_empty_data_path_names_the_config_key():
  for read in (token_records.read_dataset_info,
               lambda d: token_records.source(d, 'train')):
    with pytest.raises(UserError) as e:
      read('')
    msg = str(e.value)
    assert 'config.data.path is empty' in msg and '--config.data.path=' in msg, msg
    assert "''" not in msg, msg


# --- 3. a misspelled override key --------------------------------------------


@pytest.mark.parametrize('override', ['--config.train.setps=10',
                                      '--config.trian.steps=10'])
def test_misspelled_override_suggests_the_key(tmp_path, capsys, override):
  assert cli.main(['train', '--config', TINY, '--workdir',
                   str(tmp_path / 'w'), override]) == 2
  err = _err(capsys)
  assert 'unknown config key config.' in err, err
  assert 'did you mean config.train.steps?' in err, err
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_override_suggestions_in_the_library():
  c = config_lib.for_task('codec')
  with pytest.raises(config_lib.ConfigError, match=r'did you mean config\.train\.steps\?'):
    config_lib.apply_overrides(c, ['train.setps=10'])
  # A bare leaf name still finds its section.
  with pytest.raises(config_lib.ConfigError, match=r'config\.train\.steps'):
    config_lib.apply_overrides(c, ['steps=10'])
  # Nothing close: no guess.
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.apply_overrides(c, ['zzzzzz.qqqq=1'])
  assert 'did you mean' not in str(e.value)
  # Valid keys still apply.
  assert config_lib.apply_overrides(c, ['train.steps=7']).train.steps == 7
