"""Config errors are caught before compiling, and the message names the key."""
import json
import textwrap

import pytest

from musicjax import config as cfg


def _write(tmp_path, body):
  p = tmp_path / 'c.py'
  p.write_text(textwrap.dedent(body))
  return str(p)


def test_override_sets_typed_values():
  c = cfg.base_config()
  cfg.apply_overrides(c, ['--config.train.steps=7', 'data.segment_seconds=2',
                          'data.kind=folder', 'checkpoint.async_save=false'])
  assert c.train.steps == 7 and isinstance(c.train.steps, int)
  assert c.data.segment_seconds == 2.0 and isinstance(c.data.segment_seconds, float)
  assert c.data.kind == 'folder'
  assert c.checkpoint.async_save is False


@pytest.mark.parametrize('override, fragment', [
    ('train.stepz=3', 'config.train.stepz'),
    ('train.steps=abc', 'config.train.steps'),
    ('train.steps=1.5', 'config.train.steps'),
    ('checkpoint.async_save=maybe', 'config.checkpoint.async_save'),
    ('nokey', 'must look like'),
])
def test_bad_override_names_key(override, fragment):
  with pytest.raises(cfg.ConfigError, match=fragment.replace('.', r'\.')):
    cfg.apply_overrides(cfg.base_config(), [override])


def test_unknown_key_in_file_is_named(tmp_path):
  path = _write(tmp_path, '''
      from musicjax.config import base_config
      def get_config():
        c = base_config()
        c.train.stpes = 5
        return c
  ''')
  with pytest.raises(cfg.ConfigError, match=r'config\.train\.stpes'):
    cfg.validate(cfg._load_file(path), cfg.base_config())


def test_wrong_type_in_file_is_named(tmp_path):
  path = _write(tmp_path, '''
      from musicjax.config import base_config
      def get_config():
        c = base_config()
        c.data.batch_size = 'eight'
        return c
  ''')
  with pytest.raises(cfg.ConfigError, match=r'batch_size'):
    cfg.validate(cfg._load_file(path), cfg.base_config())


@pytest.mark.parametrize('key, value', [
    ('data.batch_size', 0), ('train.steps', -1), ('mesh.fsdp', 0),
    ('mesh.axis_type', 'manual'), ('data.segment_seconds', 0.0)])
def test_out_of_range_values_are_named(key, value):
  c = cfg.base_config()
  section, leaf = key.split('.')
  c[section][leaf] = value
  with pytest.raises(cfg.ConfigError, match=key.replace('.', r'\.')):
    cfg.validate(c, cfg.base_config())


def test_missing_file_and_missing_get_config(tmp_path):
  with pytest.raises(cfg.ConfigError, match='not found'):
    cfg.load(str(tmp_path / 'nope.py'))
  path = _write(tmp_path, 'x = 1\n')
  with pytest.raises(cfg.ConfigError, match='get_config'):
    cfg.load(path)


def test_saved_config_round_trips(tmp_path):
  c = cfg.for_task('toy')
  cfg.save(c, str(tmp_path))
  back = cfg.load_saved(str(tmp_path), ['train.steps=3'])
  assert back.train.steps == 3
  assert back.sharding.rules == c.sharding.rules  # tuples survive JSON
  with pytest.raises(cfg.ConfigError, match='config.json'):
    cfg.load_saved(str(tmp_path / 'empty'))


def test_a_run_saved_before_a_key_existed_loads_with_its_default(tmp_path):
  c = cfg.for_task('lm')
  c.train.steps = 7
  cfg.save(c, str(tmp_path))
  path = tmp_path / 'config.json'
  raw = json.loads(path.read_text())
  del raw['model']['backbone']['attention_chunk']     # keys added later
  del raw['data']['augment']
  path.write_text(json.dumps(raw))
  back = cfg.load_saved(str(tmp_path))
  assert back.train.steps == 7
  assert back.model.backbone.attention_chunk == 0
  assert back.data.augment.eq_copies == 0
  # A key the schema does not know is still an error.
  raw['model']['backbone']['no_such_key'] = 1
  path.write_text(json.dumps(raw))
  with pytest.raises(cfg.ConfigError, match='no_such_key'):
    cfg.load_saved(str(tmp_path))
