"""Unit tests of oqt_jax/train: config checks, losses, optimizer, sharding rules, metrics,
batches, and the train step's gradient accumulation (in-process, one CPU device)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from configs import base
from oqt_jax.errors import ConfigError
from oqt_jax.train import config as tcfg
from oqt_jax.train import losses, loop, metrics, optimizer
from oqt_jax.train import sharding as shd


# ------------------------------------------------------------------------ config validation
def test_base_config_is_valid():
  tcfg.validate_train_config(base.get_config())


@pytest.mark.parametrize('field,value,needle', [
    ('learning_rate', -1.0, 'learning_rate=-1.0'),
    ('num_train_steps', 0, 'num_train_steps=0'),
    ('per_device_batch_size', 0, 'per_device_batch_size=0'),
    ('lr_schedule', 'exp', "lr_schedule='exp'"),
    ('compute_dtype', 'int8', "compute_dtype='int8'"),
    ('keep_checkpoints', 0, 'keep_checkpoints=0'),
    ('adam_b2', 1.0, 'adam_b2=1.0'),
    ('gradient_accumulation_steps', 0, 'gradient_accumulation_steps=0'),
    ('warmup_steps', -5, 'warmup_steps=-5'),
    ('adam_eps', 0.0, 'adam_eps=0.0'),
])
def test_bad_training_field_names_itself(field, value, needle):
  c = base.get_config()
  c[field] = value
  with pytest.raises(ConfigError) as e:
    tcfg.validate_train_config(c)
  msg = str(e.value)
  assert msg.startswith(needle) and '\n' not in msg


@pytest.mark.parametrize('mesh,needle', [
    (dict(data=0, fsdp=1, tensor=1), 'mesh.data=0'),
    (dict(data=-1, fsdp=-1, tensor=1), 'at most one axis'),
    (dict(data=1, fsdp=1, tensor=1, pipeline=2), 'mesh.pipeline'),
])
def test_bad_mesh_config(mesh, needle):
  c = base.get_config()
  c.mesh = mesh
  with pytest.raises(ConfigError, match=needle):
    tcfg.validate_train_config(c)


def test_mesh_shape_resolves_minus_one_and_checks_device_count():
  assert tcfg.mesh_shape(dict(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)
  assert tcfg.mesh_shape(dict(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  with pytest.raises(ConfigError, match='do not divide'):
    tcfg.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(ConfigError, match='product of axis sizes is 4'):
    tcfg.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)


def test_batch_must_shard_evenly():
  c = base.get_config()
  c.per_device_batch_size = 3
  assert tcfg.check_batch_fit(c, 4, 4) == 12
  with pytest.raises(ConfigError, match='per_device_batch_size=3'):
    tcfg.check_batch_fit(c, 1, 2)
  c.global_batch_size = 8                  # a fixed global batch ignores the device count
  assert tcfg.check_batch_fit(c, 4, 4) == tcfg.check_batch_fit(c, 1, 1) == 8
  with pytest.raises(ConfigError, match='global_batch_size=8'):
    tcfg.check_batch_fit(c, 3, 3)
  c.global_batch_size = 0
  with pytest.raises(ConfigError, match='global_batch_size=0'):
    tcfg.validate_train_config(c)


# ------------------------------------------------------------------------ losses
def _np_ce(logits, labels):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


def test_mlm_loss_ignores_minus_100():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  labels = np.full((2, 5), -100)
  labels[0, 1], labels[1, 3], labels[1, 4] = 3, 6, 0
  s, c = losses.mlm_loss(jnp.asarray(logits), jnp.asarray(labels))
  sel = labels != -100
  ref = _np_ce(logits, np.where(sel, labels, 0))[sel]
  assert float(c) == 3
  np.testing.assert_allclose(float(s), ref.sum(), rtol=1e-6)


def test_clm_loss_shifts_and_masks():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
  ids = rng.integers(0, 9, size=(2, 6))
  mask = np.ones((2, 6), np.int32)
  mask[1, 4:] = 0                     # padding at the end of row 1
  labels = ids.copy()
  labels[0, 2] = -100                 # an ignored target
  s, c = losses.clm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  ce = _np_ce(logits[:, :-1], np.where(labels[:, 1:] < 0, 0, labels[:, 1:]))
  w = (labels[:, 1:] != -100) & (mask[:, 1:] > 0)
  assert float(c) == w.sum() == 10 - 1 - 2
  np.testing.assert_allclose(float(s), (ce * w).sum(), rtol=1e-6)
  assert math.isclose(float(losses.perplexity(s / c)), math.exp(float(s / c)), rel_tol=1e-5)


# ------------------------------------------------------------------------ optimizer
def test_weight_decay_mask():
  params = {'layer': {'fc1': {'kernel': 0, 'bias': 0}, 'ln': {'scale': 0, 'bias': 0}},
            'embed': {'embedding': 0}, 'mlm_bias': 0,
            'gate': {'kernel1': 0, 'bias1': 0, 'bias2': 0}}
  m = optimizer.weight_decay_mask(params, decay_layer_norm=False)
  assert m['layer']['fc1'] == {'kernel': True, 'bias': False}
  assert m['layer']['ln'] == {'scale': False, 'bias': False}
  assert m['embed']['embedding'] and not m['mlm_bias']
  assert m['gate'] == {'kernel1': True, 'bias1': False, 'bias2': False}
  m = optimizer.weight_decay_mask(params, decay_layer_norm=True)
  assert m['layer']['ln'] == {'scale': True, 'bias': False}


def test_weight_decay_applies_only_where_masked():
  c = base.get_config()
  c.learning_rate, c.warmup_steps, c.weight_decay, c.max_grad_norm = 0.1, 0, 0.5, 0.0
  c.lr_schedule = 'constant'
  tx, _ = optimizer.make_optimizer(c)
  params = {'d': {'kernel': jnp.ones(3), 'bias': jnp.ones(3)}, 'ln': {'scale': jnp.ones(3)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, tx.init(params), params)
  assert np.allclose(upd['d']['kernel'], -0.1 * 0.5)     # decoupled decay: -lr * wd * w
  assert np.allclose(upd['d']['bias'], 0.0)
  assert np.allclose(upd['ln']['scale'], 0.0)


def test_schedule_warmup_then_linear_decay():
  c = base.get_config()
  c.learning_rate, c.warmup_steps, c.num_train_steps = 1e-3, 10, 110
  s = optimizer.make_schedule(c)
  assert float(s(0)) == 0.0
  assert math.isclose(float(s(5)), 5e-4, rel_tol=1e-5)
  assert math.isclose(float(s(10)), 1e-3, rel_tol=1e-5)
  assert math.isclose(float(s(60)), 5e-4, rel_tol=1e-5)
  assert abs(float(s(110))) < 1e-9
  c.lr_schedule = 'cosine'
  assert math.isclose(float(optimizer.make_schedule(c)(60)), 5e-4, rel_tol=1e-4)


def test_clipping_on_or_off_keeps_the_state_layout():
  c = base.get_config()
  params = {'w': jnp.ones(2)}
  with_clip = jax.tree.structure(optimizer.make_optimizer(c)[0].init(params))
  c.max_grad_norm = 0.0
  assert jax.tree.structure(optimizer.make_optimizer(c)[0].init(params)) == with_clip


# ------------------------------------------------------------------------ sharding rules
MESH = AbstractMesh((2, 2, 2), ('data', 'fsdp', 'tensor'))


@pytest.mark.parametrize('logical,shape,expected', [
    (('embed', 'mlp'), (32, 64), P('fsdp', 'tensor')),
    (('vocab', 'embed'), (512, 32), P('tensor', 'fsdp')),
    (('mlp', 'embed'), (64, 32), P('tensor', 'fsdp')),
    (('heads', 'embed'), (32, 32), P('tensor', 'fsdp')),
    (('norm',), (32,), P()),
    (('gate', None), (2, 16), P()),
    (('vocab', 'embed'), (511, 32), P(None, 'fsdp')),       # odd vocab: rows replicated
    (('embed', 'embed'), (32, 32), P('fsdp')),              # a mesh axis is used once
    (None, (4,), P()),
])
def test_logical_to_mesh_spec(logical, shape, expected):
  assert shd.logical_to_mesh_spec(logical, shape, MESH) == expected


def test_batch_sharding_uses_data_and_fsdp():
  m = jax.make_mesh((1, 1, 1), ('data', 'fsdp', 'tensor'),
                    axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert shd.batch_sharding(m, 2).spec == P(None, None) or shd.batch_sharding(m, 2).spec == P()


@pytest.mark.parametrize('env,expected', [
    ({}, False),
    ({'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '1'}, False),
    ({'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '4'}, True),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, True),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, False),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, True),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, True),
])
def test_multiprocess_detection(env, expected):
  assert shd.multiprocess_launch(env) is expected


def test_single_process_skips_distributed_initialize():
  assert shd.maybe_initialize_distributed('auto', env={}) is False
  assert shd.maybe_initialize_distributed('no', env={'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '8'}) \
      is False


# ------------------------------------------------------------------------ metrics
def test_metrics_jsonl_survives_a_torn_line(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), enabled=True, tensorboard=False)
  w.write(1, {'loss': np.float32(2.5), 'lr': 1e-3})
  w.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as fh:
    fh.write('{"step": 2, "kind": "tra')          # a kill -9 mid-write
  w = metrics.MetricWriter(str(tmp_path), enabled=True, tensorboard=False)
  w.write(2, {'loss': 2.0})
  w.write(1, {'loss': 2.4})                       # a resumed run writes step 1 again
  w.close()
  got = metrics.read_metrics(str(tmp_path))
  assert got[1]['loss'] == 2.4 and got[2]['loss'] == 2.0
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert json.loads(lines[-1])['step'] == 1


def test_tensorboard_events_written(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), enabled=True)
  w.write(3, {'loss': 1.5})
  w.close()
  events = list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  assert events and events[0].stat().st_size > 0


# ------------------------------------------------------------------------ config resolution
class _Tok:
  pad_token_id = 1

  def __len__(self):
    return 700


def test_resolve_config_takes_vocab_pad_and_dtype():
  c = base.get_config()
  c.compute_dtype = 'bfloat16'
  r = loop.resolve_config(c, _Tok())
  assert r.model.vocab_size == 700 and r.model.pad_token_id == 1
  assert r.model.dtype == 'bfloat16'
  assert c.model.vocab_size == 30522 and c.model.dtype == 'float32'   # input untouched
  c = base.get_config()
  c.data.tokenizer, c.model.vocab_size = 'some/hub-tokenizer', 600
  with pytest.raises(ConfigError, match='model.vocab_size=600'):
    loop.resolve_config(c, _Tok())


class _Rows:
  def batch(self, step, batch_size, process_index=0, process_count=1):
    ids = np.arange(batch_size * 4, dtype=np.int32).reshape(batch_size, 4) + 1000 * step
    return {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'labels': ids}


def test_host_batch_splits_one_step_into_micro_batches():
  hb = loop.host_batch(_Rows(), 3, global_rows=4, accum=2)
  assert hb['input_ids'].shape == (2, 4, 4)
  full = _Rows().batch(3, 8)['input_ids']
  np.testing.assert_array_equal(hb['input_ids'].reshape(8, 4), full)


# ------------------------------------------------------------------------ non-finite guard
def test_tree_all_finite_flags_any_nan_or_inf_and_compiles_linearly():
  from oqt_jax.train.step import keep_if_not_finite, tree_all_finite
  ok = {'s': jnp.ones(()), 'big': jnp.ones((5000,)), 'h': jnp.ones((3,), jnp.bfloat16),
        'n': jnp.ones((), jnp.int32)}
  assert bool(tree_all_finite(ok)) and bool(tree_all_finite({}))
  for k in ('s', 'big', 'h'):
    for v in (np.nan, np.inf, -np.inf):
      bad = dict(ok, **{k: ok[k].at[..., -1].set(v) if ok[k].ndim else jnp.asarray(v)})
      assert not bool(tree_all_finite(bad)), (k, v)
  # Many scalar leaves (QAT's range state): the compiled guard grows linearly with the number
  # of leaves (per-leaf scalar checks fused into every select grew quadratically).
  def step(ps, gs):
    new = [p - 0.1 * g for p, g in zip(ps, gs)]
    return keep_if_not_finite(tree_all_finite(new), new, ps)
  sizes = {}
  for n in (20, 60):
    ps = [jnp.full((), i, jnp.float32) for i in range(n)]
    sizes[n] = jax.jit(step).lower(ps, ps).compile().as_text().count('\n')
  assert sizes[60] < 4 * sizes[20], sizes
  gs = [jnp.float32(1.0)] * 59 + [jnp.float32(np.nan)]
  out = jax.jit(step)(ps, gs)
  np.testing.assert_array_equal(np.asarray(out), np.arange(60, dtype=np.float32))
  out = jax.jit(step)(ps, [jnp.float32(1.0)] * 60)
  np.testing.assert_allclose(np.asarray(out), np.arange(60, dtype=np.float32) - 0.1, rtol=1e-6)
