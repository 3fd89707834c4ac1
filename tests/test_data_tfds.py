"""The TFDS chorale builder: a tiny build read back through tfds.data_source."""
import json

import numpy as np
import soundfile as sf
import tensorflow_datasets as tfds

from musicjax.config import base_config
from musicjax.data import chorales
from musicjax.data import pipeline
from musicjax.data import tfds_chorales


def test_build_and_read_back_equal_audio(tmp_path):
  c = base_config()
  c.data.kind = 'tfds'
  c.data.cache_dir = str(tmp_path / 'cache')
  c.data.max_pieces = 3
  c.data.sample_rate = 16000
  c.data.segment_seconds = 0.5
  c.data.batch_size = 2
  c.data.eval_batch_size = 1
  tfds_chorales.build(c)
  ds = tfds.data_source(tfds_chorales.NAME,
                        data_dir=tfds_chorales.tfds_data_dir(c))
  for split in ('train', 'eval'):
    manifest = chorales.chorale_manifest(c, split)
    examples = [ds[split][i] for i in range(len(ds[split]))]
    assert len(examples) == len(manifest)
    by_id = {e['id'].decode(): e for e in examples}
    assert set(by_id) == {m['id'] for m in manifest}
    for m in manifest:
      ex = by_id[m['id']]
      assert json.loads(ex['meta'].decode()) == m['meta']
      assert ex['sample_rate'] == 16000
      for stem, path in m['stems'].items():
        want, _ = sf.read(path, dtype='int16')
        np.testing.assert_array_equal(ex[stem], want)
  batch = next(iter(pipeline.audio_dataset(c, 'train')))
  assert batch['audio'].shape == (2, 8000, 1)
  assert np.all(np.isfinite(batch['audio']))
  # A second build reuses the prepared files.
  assert tfds_chorales.build(c).info.splits['train'].num_examples == 2
