"""eval.py end to end (subprocess, no network) on an hf.save'd tiny model; model loading."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from oqt_jax import models
from oqt_jax.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(model_type='bert'):
  cfg = models.ModelConfig(model_type=model_type, vocab_size=2048, hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=64, max_position_embeddings=64,
                           activation='gelu' if model_type == 'bert' else 'relu',
                           pad_token_id=0 if model_type == 'bert' else 1)
  model = models.build(cfg)
  return model, models.init_variables(model, jax.random.PRNGKey(0))


def _eval(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1',
             TRANSFORMERS_OFFLINE='1')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=600)


def test_eval_py_end_to_end(tmp_path):
  from oqt_jax.models import hf
  model, variables = _tiny()
  hf.save(model, variables, str(tmp_path / 'hf'))
  r = _eval('--config', os.path.join(ROOT, 'configs/tiny_bert_vanilla.py'),
            '--workdir', str(tmp_path), '--quantize', '--num_batches=2', '--batch_size=4',
            '--config.data.max_seq_length=32', '--config.quant.est_num_batches=2',
            '--noprogress')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'perplexity' in r.stdout and 'quantized max kurtosis' in r.stdout
  with open(tmp_path / 'eval_metrics.json') as fh:
    m = json.load(fh)
  for key in ('perplexity', 'max_inf_norm', 'avg_kurtosis', 'max_kurtosis', 'per_layer'):
    assert key in m and key in m['quantized'], key
  assert len(m['per_layer']) == 2 and 'ffn_output' in m['per_layer'][0]
  assert m['perplexity'] > 1 and m['quantized']['perplexity'] > 1
  assert m['quantized']['quant_config']['n_bits'] == 8
  for png in ('eval_per_layer.png', 'eval_histogram.png'):
    with open(tmp_path / png, 'rb') as fh:
      assert fh.read(8) == b'\x89PNG\r\n\x1a\n', png


def test_eval_py_errors_are_one_line(tmp_path):
  r = _eval('--config', os.path.join(ROOT, 'configs/tiny_bert_vanilla.py'),
            '--workdir', str(tmp_path / 'empty'))
  assert r.returncode == 2
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'no checkpoint' in last, r.stderr[-2000:]
  r = _eval('--config', os.path.join(ROOT, 'configs/tiny_bert_vanilla.py'),
            '--workdir', str(tmp_path), '--quantize', "--config.quant.quant_dict={'Q': 8}")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: quant.quant_dict: unknown point 'Q'")


def test_load_model_prefers_newest_and_reads_orbax(tmp_path):
  import ml_collections
  import orbax.checkpoint as ocp
  from configs import base
  from oqt_jax.evaluate import run
  model, variables = _tiny('opt')
  config = base.get_config()
  config.model = ml_collections.ConfigDict(
      {k: getattr(model.cfg, k) for k in models.ModelConfig.__dataclass_fields__})
  with pytest.raises(CheckpointError, match='no checkpoint'):
    run.load_model(config, str(tmp_path))
  with open(tmp_path / 'config.json', 'w') as fh:
    fh.write(config.to_json_best_effort())
  mngr = ocp.CheckpointManager(str(tmp_path / 'checkpoints'))
  mngr.save(7, args=ocp.args.StandardSave({'step': np.int32(7), 'params': variables['params'],
                                           'opt_state': {}, 'rng': np.zeros(2, np.uint32)}))
  mngr.wait_until_finished()
  mngr.close()
  loaded, lvars, src = run.load_model(config, str(tmp_path))
  assert src.endswith(os.path.join('checkpoints', '7')) and loaded.cfg == model.cfg
  same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                lvars['params'], variables['params'])
  assert all(jax.tree_util.tree_leaves(same))
  # A newer HF export wins over an older Orbax step.
  from oqt_jax.models import hf
  hf.save(model, variables, str(tmp_path / 'hf'))
  assert run.load_model(config, str(tmp_path))[2] == str(tmp_path / 'hf')
