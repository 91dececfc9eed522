"""bench/: the shared shapes, the GPU mode's refusal without a GPU and its worker path on the
CPU (the timed runs are scripts, not tests)."""
import os
import subprocess
import sys

import numpy as np

from oqt_jax.train import testing

sys.path.insert(0, os.path.join(testing.REPO_ROOT, 'bench'))
import shapes  # noqa: E402


def test_mlm_batch_masks_15_percent_and_never_the_special_tokens():
  b = shapes.make_batch('bert', 16, 128)
  sel = b['labels'] != -100
  assert not sel[:, 0].any() and not sel[:, -1].any()
  assert 0.10 < sel.mean() < 0.20
  assert (b['input_ids'][sel] == 103).mean() > 0.6      # mostly [MASK]
  o = shapes.make_batch('opt', 2, 8)
  np.testing.assert_array_equal(o['labels'], o['input_ids'])


def test_flops_per_token_counts_the_vocabulary_projection():
  f = shapes.flops_per_token('opt', 12, 768, 3072, 512, 50272)
  head = 3 * 2 * 768 * 50272
  layers = 3 * 12 * (2 * (4 * 768 ** 2 + 2 * 768 * 3072) + 4 * 512 * 768)
  assert f == head + layers


def test_gpu_mode_without_a_gpu_says_so():
  env = testing.subprocess_env()
  r = subprocess.run([sys.executable, os.path.join(testing.REPO_ROOT, 'bench', 'train_step.py'),
                      '--device', 'gpu'], capture_output=True, text=True, env=env, timeout=300,
                     cwd=testing.REPO_ROOT)
  assert r.returncode == 1
  assert 'error: --device gpu: no GPU' in r.stdout


def test_gpu_mode_worker_runs_a_bfloat16_step_on_cpu():
  """The GPU mode's worker path (bfloat16 model, one-device mesh, timed steps), exercised on
  the CPU at a tiny shape, so that a GPU run does not meet it for the first time."""
  import common   # noqa: E402  (bench/common.py)
  shape = dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, seq_len=16,
               batch=2)
  with common.Worker('oqt_jax', 'jax_worker.py', env=common.child_env(cpu=True)) as w:
    info = w.call(cmd='setup', model_type='bert', variant='vanilla', shape=shape, warmup=1,
                  dtype='bfloat16', mesh=dict(data=1, fsdp=1, tensor=1))
    times = w.call(cmd='time', steps=2)['times']
  assert info['compile_s'] > 0
  assert len(times) == 2 and all(t > 0 for t in times)
