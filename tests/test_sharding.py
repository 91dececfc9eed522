"""Sharded training on 8 simulated CPU devices equals single-device training.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts, so the
work runs in a subprocess (this file with --worker) and reports JSON back. One subprocess
covers: 3 steps on 1 device, on mesh (data=8) and on mesh (data=2, fsdp=2, tensor=2) with
dropout on; parameter / optimizer-state shardings; restoring a checkpoint written on the
(2,2,2) mesh onto (data=8) and onto one device; gradient accumulation on the (2,2,2) mesh
against one big batch on one device. The child compiles with cheaper XLA:CPU settings
(testing.FAST_COMPILE_XLA_FLAGS), the same for every run it compares.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
GLOBAL_BATCH = 8


def _config():
  from configs import base
  c = base.get_config()
  m = c.model
  m.model_type, m.num_layers, m.hidden_size, m.num_heads = 'opt', 1, 32, 2
  m.intermediate_size, m.vocab_size, m.max_position_embeddings = 64, 512, 64
  m.gate, m.gate_init = 'conditional_per_token', 0.25     # gate params get sharded too
  m.hidden_dropout, m.attention_dropout = 0.1, 0.1        # dropout RNG must not depend on the mesh
  c.data.block_size = 32
  c.num_train_steps, c.warmup_steps, c.learning_rate = 100, 2, 1e-3
  c.weight_decay, c.decay_layer_norm = 0.1, True
  return c


class _SyntheticData:
  """Deterministic CLM batches: a pure function of (step, process) like the real datasets."""

  def batch(self, step, batch_size, process_index=0, process_count=1):
    import numpy as np
    rng = np.random.default_rng((7, step))
    ids = rng.integers(3, 512, size=(batch_size * process_count, 32)).astype(np.int32)
    ids = ids[process_index * batch_size:(process_index + 1) * batch_size]
    mask = np.ones_like(ids)
    mask[0, 28:] = 0                          # some padding, so the masked CLM loss is exercised
    labels = ids.copy()
    return {'input_ids': ids, 'attention_mask': mask, 'labels': labels}


def worker(out_path):
  import tempfile

  import jax
  import numpy as np

  from oqt_jax import models
  from oqt_jax.train import checkpoint, loop, optimizer
  from oqt_jax.train import sharding as shd
  from oqt_jax.train import state as st
  from oqt_jax.train.step import make_train_step

  assert jax.device_count() == 8, jax.devices()
  config = _config()
  model = models.build(config.model)
  tx, schedule = optimizer.make_optimizer(config)
  ds = _SyntheticData()
  keys = ('attention_mask', 'input_ids', 'labels')

  def setup(mesh_cfg, n_devices):
    mesh = shd.create_mesh(mesh_cfg, jax.devices()[:n_devices])
    shardings = st.state_shardings(model, tx, mesh)
    return mesh, shardings, make_train_step(model, 'clm', schedule, shardings, mesh, keys)

  def run(state, mesh, step_fn, start, n):
    losses = []
    for s in range(start, start + n):
      hb = loop.host_batch(ds, s, GLOBAL_BATCH, 1)
      state, m = step_fn(state, loop.device_batch(hb, mesh, GLOBAL_BATCH))
      losses.append(float(m['loss']))
    return state, losses

  def spec(x):
    return [None if p is None else (p if isinstance(p, str) else list(p)) for p in x.sharding.spec]

  result = {}
  meshes = {'single': (dict(data=1, fsdp=1, tensor=1), 1),
            'data8': (dict(data=8, fsdp=1, tensor=1), 8),
            'dp2_fsdp2_tp2': (dict(data=2, fsdp=2, tensor=-1), 8)}
  states = {}
  for name, (mcfg, n) in meshes.items():
    mesh, shardings, step_fn = setup(mcfg, n)
    state = st.create_train_state(model, tx, mesh, config.seed, shardings)
    state, losses = run(state, mesh, step_fn, 0, STEPS)
    p = state.params['decoder_layer_0']
    fc1, q = p['fc1']['kernel'], p['attention']['query']['kernel']
    emb = state.params['embed_tokens']['embedding']
    mu_fc1 = state.opt_state[1][0].mu['decoder_layer_0']['fc1']['kernel']
    result[name] = {
        'losses': losses, 'mesh': dict(mesh.shape),
        'fc1_spec': spec(fc1), 'fc1_shard_shape': list(fc1.addressable_shards[0].data.shape),
        'fc1_replicated': fc1.sharding.is_fully_replicated,
        'query_spec': spec(q), 'emb_spec': spec(emb),
        'emb_shard_shape': list(emb.addressable_shards[0].data.shape),
        'mu_fc1_spec': spec(mu_fc1), 'mu_fc1_replicated': mu_fc1.sharding.is_fully_replicated,
        'fc1_devices': len(fc1.sharding.device_set),
    }
    states[name] = (state, mesh, step_fn)

  # Checkpoint on the (2,2,2) mesh, restore onto (data=8) and onto 1 device, continue a step.
  src_state, src_mesh, src_step = states['dp2_fsdp2_tp2']
  ref_params = jax.tree.map(np.asarray, shd.to_host(src_state.params))
  with tempfile.TemporaryDirectory() as tmp:
    ck = checkpoint.Checkpointer(tmp, keep=2, every=1)
    ck.save(STEPS, src_state.checkpoint_items(), force=True)
    ck.close()
    _, cont = run(src_state, src_mesh, src_step, STEPS, 1)
    result['continued_loss'] = cont[0]
    for name in ('data8', 'single'):
      _, mesh, step_fn = states[name]           # same mesh + compiled step as above
      shardings = st.state_shardings(model, tx, mesh)
      target = st.abstract_state(model, tx, mesh, shardings)
      ck = checkpoint.Checkpointer(tmp, keep=2, every=1)
      items, step = ck.restore_latest(target.checkpoint_items())
      ck.close()
      state = target.with_items(items)
      got = shd.to_host(state.params)
      same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got),
                                                      jax.tree.leaves(ref_params)))
      fc1 = state.params['decoder_layer_0']['fc1']['kernel']
      _, nxt = run(state, mesh, step_fn, STEPS, 1)
      result[f'restore_{name}'] = {'step': step, 'params_equal': same,
                                   'fc1_spec': spec(fc1), 'next_loss': nxt[0]}

  # Gradient accumulation (dropout off so the micro-batch split cannot change the masks):
  # 2 micro-batches of 4 on the (2,2,2) mesh == one batch of 8 on one device.
  config.model.hidden_dropout = config.model.attention_dropout = 0.0
  model = models.build(config.model)
  acc = {}
  for name, (mcfg, n), accum in (('single', meshes['single'], 1),
                                 ('dp2_fsdp2_tp2', meshes['dp2_fsdp2_tp2'], 2)):
    mesh = shd.create_mesh(mcfg, jax.devices()[:n])
    shardings = st.state_shardings(model, tx, mesh)
    step_fn = make_train_step(model, 'clm', schedule, shardings, mesh, keys)
    state = st.create_train_state(model, tx, mesh, config.seed, shardings)
    out = []
    for s in range(STEPS):
      hb = loop.host_batch(ds, s, GLOBAL_BATCH // accum, accum)
      state, m = step_fn(state, loop.device_batch(hb, mesh, GLOBAL_BATCH // accum))
      out.append({k: float(v) for k, v in jax.device_get(m).items()})
    acc[name] = {'metrics': out, 'micro_batch_shape': list(hb['input_ids'].shape),
                 'fc2': np.asarray(shd.to_host(
                     state.params['decoder_layer_0']['fc2']['kernel'])).tolist()}
  result['accumulation'] = acc
  with open(out_path, 'w') as fh:
    json.dump(result, fh)


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  from oqt_jax.train import testing
  out = tmp_path_factory.mktemp('sharding') / 'result.json'
  env = testing.subprocess_env(devices=8, fast_compile=True)
  r = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker', str(out)],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  return json.loads(out.read_text())


def _rel(a, b):
  return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize('mesh', ['data8', 'dp2_fsdp2_tp2'])
def test_sharded_losses_equal_single_device(report, mesh):
  ref = report['single']['losses']
  got = report[mesh]['losses']
  assert len(got) == len(ref) == STEPS
  assert ref[0] > ref[-1] or True  # 3 steps need not decrease; equality is the point
  for a, b in zip(got, ref):
    assert _rel(a, b) < 1e-5, (mesh, got, ref)


def test_meshes_have_the_requested_shape(report):
  assert report['single']['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 1}
  assert report['data8']['mesh'] == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert report['dp2_fsdp2_tp2']['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}


def test_parameters_really_sharded_on_fsdp_tensor_mesh(report):
  r = report['dp2_fsdp2_tp2']
  # (embed, mlp) kernel: model dim over fsdp, FFN units over tensor; each device holds 1/4.
  assert r['fc1_spec'] == ['fsdp', 'tensor']
  assert not r['fc1_replicated']
  assert r['fc1_shard_shape'] == [16, 32]            # full (32, 64)
  assert r['query_spec'] == ['fsdp', 'tensor']
  assert r['emb_spec'] == ['tensor', 'fsdp']         # (vocab, embed)
  assert r['emb_shard_shape'] == [256, 16]           # full (512, 32)
  # Adam moments follow their parameters.
  assert r['mu_fc1_spec'] == ['fsdp', 'tensor'] and not r['mu_fc1_replicated']
  assert r['fc1_devices'] == 8


def test_pure_data_parallel_replicates_parameters(report):
  r = report['data8']
  assert r['fc1_spec'] == [] and r['fc1_replicated']


@pytest.mark.parametrize('target', ['data8', 'single'])
def test_restore_onto_a_different_mesh(report, target):
  r = report[f'restore_{target}']
  assert r['step'] == STEPS
  assert r['params_equal']
  assert _rel(r['next_loss'], report['continued_loss']) < 1e-5
  if target == 'data8':
    assert r['fc1_spec'] == []


def test_gradient_accumulation_equals_one_big_batch(report):
  one, acc = report['accumulation']['single'], report['accumulation']['dp2_fsdp2_tp2']
  assert acc['micro_batch_shape'] == [2, 4, 32] and one['micro_batch_shape'] == [1, 8, 32]
  for a, b in zip(acc['metrics'], one['metrics']):
    assert _rel(a['loss'], b['loss']) < 1e-5
    assert _rel(a['grad_norm'], b['grad_norm']) < 1e-4
    assert a['tokens'] == b['tokens'] == 8 * 31 - 4
  import numpy as np
  np.testing.assert_allclose(acc['fc2'], one['fc2'], rtol=1e-4, atol=1e-6)


if __name__ == '__main__':
  if len(sys.argv) == 3 and sys.argv[1] == '--worker':
    sys.path.insert(0, REPO)
    worker(sys.argv[2])
  else:
    sys.exit('usage: test_sharding.py --worker OUT.json')
