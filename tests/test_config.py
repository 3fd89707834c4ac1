"""Config errors are caught before compiling, and the message names the key."""
import json
import os
import textwrap

import pytest

from musicjax import cli
from musicjax import config as cfg
from musicjax.cli import flags as cli_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# --- configs by name, PATH:ARG, `--config.a.b value` (issue 17, item 5) -----


def test_shipped_configs_resolve_by_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the documented configs/... paths work anywhere
  want = os.path.join(ROOT, 'configs', 'lm', 'tiny.py')
  for spec in ('lm/tiny', 'lm/tiny.py', 'configs/lm/tiny.py', './lm/tiny'):
    assert os.path.samefile(cfg.resolve(spec), want), spec
  assert 'codec/tiny' in cfg.shipped_names() and 'lm/tiny' in cfg.shipped_names()
  assert cfg.load('codec/tiny').task == 'codec'


def test_an_existing_file_wins_over_a_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'lm').mkdir()
  (tmp_path / 'lm' / 'tiny.py').write_text(textwrap.dedent('''
      from musicjax.config import for_task
      def get_config():
        c = for_task('codec')
        c.train.steps = 11
        return c
  '''))
  assert cfg.resolve('lm/tiny.py') == 'lm/tiny.py'
  assert cfg.load('lm/tiny.py').train.steps == 11
  assert cfg.load('lm/tiny').task == 'lm'  # no such file: the shipped name


def test_unknown_name_lists_the_configs_and_guesses():
  with pytest.raises(cfg.ConfigError) as e:
    cfg.resolve('lm/tinny')
  msg = str(e.value)
  assert 'config file not found: lm/tinny' in msg, msg
  assert 'did you mean lm/tiny?' in msg, msg
  assert 'codec/base' in msg and 'accomp/tiny' in msg, msg
  with pytest.raises(cfg.ConfigError) as e:
    cfg.resolve('zzzz/qqqq')
  assert 'did you mean' not in str(e.value) and 'lm/tiny' in str(e.value)
  with pytest.raises(cfg.ConfigError,
                     match='did you mean accomp/tiny or codec/tiny or lm/tiny'):
    cfg.resolve('tiny')


_WITH_ARG = '''
    from musicjax.config import for_task
    def get_config(arg=None):
      c = for_task('codec')
      if arg:
        c.train.steps = int(arg)
      return c
'''


def test_path_colon_arg_is_passed_to_get_config(tmp_path):
  path = _write(tmp_path, _WITH_ARG)
  assert cfg.load(f'{path}:42').train.steps == 42
  assert cfg.load(path).train.steps == 1000  # no arg: the default
  # Overrides apply after get_config(arg).
  assert cfg.load(f'{path}:42', ['train.steps=5']).train.steps == 5


def test_colon_arg_with_a_name_and_a_file_with_a_colon(tmp_path, monkeypatch):
  p = tmp_path / 'a:b.py'
  p.write_text(textwrap.dedent(_WITH_ARG))
  assert cfg.load(str(p)).train.steps == 1000  # an existing file stays whole
  # The text after the first colon, colons and slashes included.
  seen = tmp_path / 'seen.py'
  seen.write_text(textwrap.dedent('''
      from musicjax.config import for_task
      def get_config(arg):
        c = for_task('codec')
        c.data.path = arg
        return c
  '''))
  assert cfg.load(f'{seen}:x/y:z').data.path == 'x/y:z'


def test_colon_arg_errors(tmp_path):
  path = _write(tmp_path, '''
      from musicjax.config import for_task
      def get_config():
        return for_task('codec')
  ''')
  with pytest.raises(cfg.ConfigError, match=r'without a parameter.*":7"'):
    cfg.load(f'{path}:7')
  with pytest.raises(cfg.ConfigError, match='without a parameter'):
    cfg.load('codec/tiny:7')
  needs = tmp_path / 'needs.py'
  needs.write_text(textwrap.dedent('''
      from musicjax.config import for_task
      def get_config(arg):
        return for_task('codec')
  '''))
  with pytest.raises(cfg.ConfigError, match=r'needs an argument.*:ARG'):
    cfg.load(str(needs))


def test_bare_bool_override_is_true_and_other_bare_keys_fail():
  c = cfg.base_config()
  cfg.apply_overrides(c, ['--config.train.eval_at_start'])
  assert c.train.eval_at_start is True
  with pytest.raises(cfg.ConfigError, match='must look like'):
    cfg.apply_overrides(c, ['--config.train.steps'])


def test_cli_joins_space_separated_overrides():
  j = cli_flags.join_overrides
  assert j(['train', '--config', 'lm/tiny', '--config.train.steps', '5',
            '--config.mesh.data', '-1', '--workdir', 'w']) == [
                'train', '--config', 'lm/tiny', '--config.train.steps=5',
                '--config.mesh.data=-1', '--workdir', 'w']
  # `=` forms, a bare key before another option, and a trailing bare key stay.
  argv = ['--config.a=1', '--config.train.eval_at_start', '--workdir', 'w',
          '--config.b']
  assert j(argv) == argv


def test_cli_space_form_reaches_the_config(tmp_path, capsys):
  # Both forms, by name: a misspelled key fails before anything is built.
  for override in (['--config.train.setps', '10'], ['--config.train.setps=10']):
    assert cli.main(['train', '--config', 'codec/tiny', '--workdir',
                     str(tmp_path / 'w'), *override]) == 2
    err = capsys.readouterr().err
    assert 'did you mean config.train.steps?' in err, err
  # A well-formed space override parses (type-checked: a str for an int fails).
  assert cli.main(['train', '--config', 'codec/tiny', '--workdir',
                   str(tmp_path / 'w'), '--config.train.steps', 'many']) == 2
  assert 'config.train.steps' in capsys.readouterr().err
