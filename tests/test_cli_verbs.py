"""The `musicjax` command: every verb has its subparser and its handler."""
import re
import subprocess
import sys

import pytest

from musicjax.cli import app

VERBS = {'train', 'eval', 'encode', 'decode', 'codec-quality', 'prepare',
         'tokenizer', 'generate', 'accompany', 'prefs', 'export',
         'import-torch', 'merge-lora', 'import-heartmula', 'import-dac', 'export-dac',
         'import-encodec', 'export-encodec', 'import-musicgen', 'export-musicgen',
         'bench'}


def test_every_verb_has_a_handler_and_is_listed_in_help(capsys):
  parser, handlers = app.parser_and_handlers()
  assert set(handlers) == VERBS
  assert all(callable(h) for h in handlers.values())
  listed = parser.format_help()
  for verb in VERBS:
    assert re.search(rf'^    {re.escape(verb)}\s', listed, re.M), verb


@pytest.mark.parametrize('verb', sorted(VERBS))
def test_each_verb_parses_its_own_help(verb, capsys):
  with pytest.raises(SystemExit) as e:
    app.main([verb, '--help'])
  assert e.value.code == 0
  assert f'usage: musicjax {verb}' in capsys.readouterr().out


def test_unknown_verb_and_flag_exit_2(capsys):
  with pytest.raises(SystemExit) as e:
    app.main(['nonsense'])
  assert e.value.code == 2
  with pytest.raises(SystemExit) as e:
    app.main(['train', '--workdir', 'w', '--no-such-flag'])
  assert e.value.code == 2
  assert 'unrecognized arguments: --no-such-flag' in capsys.readouterr().err


def test_runs_as_a_module():
  r = subprocess.run([sys.executable, '-m', 'musicjax.cli', '--help'],
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stderr
  assert 'usage: musicjax' in r.stdout and 'import-torch' in r.stdout
