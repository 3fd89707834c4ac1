"""Bad-input helpers shared by the released-checkpoint import tests: a copy
of a folder with its tensors or config.json replaced, and the check that an
import verb fails naming what is wrong and leaves no run behind."""
from __future__ import annotations

import json
import os
import shutil

from safetensors.numpy import save_file

from musicjax import cli
from musicjax.export.released import reader
from musicjax.train import new_run

SINGLE = reader.SINGLE
CONFIG = 'config.json'


def tensors(folder: str) -> dict:
  r = reader.Reader(folder)
  return {n: r.get(n) for n in r.names}


def copy(folder: str, dst: str, tensors=None, config=None) -> str:
  """`folder` at `dst` (every other file too), with its tensors or its
  config.json (`config(dict) -> dict`) replaced."""
  shutil.copytree(folder, dst)
  if tensors is not None:
    save_file(tensors, os.path.join(dst, SINGLE))
  if config is not None:
    with open(os.path.join(folder, CONFIG)) as f:
      d = json.load(f)
    with open(os.path.join(dst, CONFIG), 'w') as f:
      json.dump(config(d), f)
  return dst


def fails(capsys, verb: str, src: str, run: str, *needles: str) -> str:
  """`musicjax VERB --from src --workdir run` exits 2 with every needle in
  its error, and leaves neither the run nor its staging folder."""
  assert cli.main([verb, '--from', src, '--workdir', run]) == 2
  err = capsys.readouterr().err
  for needle in needles:
    assert needle in err, err
  assert not os.path.exists(run)
  assert not os.path.exists(new_run.staging_dir(run))
  return err


def t5_tokenizer(path: str, words) -> None:
  """A T5-like tokenizer.json at `path`: '<pad>' 0, '</s>' 1, '<unk>' 2, then
  `words`, with '</s>' appended (MusicGen's processor adds T5's
  end-of-sequence token)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = {'<pad>': 0, '</s>': 1, '<unk>': 2}
  vocab.update({w: i + 3 for i, w in enumerate(words)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single='$A </s>', special_tokens=[('</s>', 1)])
  tok.save(path)
