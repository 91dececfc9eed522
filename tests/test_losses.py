"""The training fast-path losses (oqt_jax/train/losses.py) against the plain full-logit losses
and an independent torch restatement: values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from oqt_jax import models
from oqt_jax.models import lm_loss
from oqt_jax.train import losses

B, T = 4, 32


def _tiny(model_type, **kw):
  cfg = models.ModelConfig(model_type=model_type, vocab_size=97, hidden_size=32, num_layers=1,
                           num_heads=2, intermediate_size=64, max_position_embeddings=64,
                           hidden_dropout=0.0, attention_dropout=0.0, **kw).validate()
  model = models.build(cfg)
  params = models.init_variables(model, jax.random.PRNGKey(0))['params']
  return model, params


@pytest.fixture(scope='module')
def bert():
  return _tiny('bert')


@pytest.fixture(scope='module')
def opt():
  return _tiny('opt', activation='relu', layer_norm_eps=1e-5)


def _mlm_batch(seed, p):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 97, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, T - 7:] = 0
  labels = np.where(rng.random((B, T)) < p, ids, -100).astype(np.int32)
  labels[1, T - 3] = 11            # a label on padding: ignored by both paths
  return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _both_mlm(model, params, batch, k, groups=1):
  def full(p):
    out = model.apply({'params': p}, batch['input_ids'], batch['attention_mask'])
    return losses.mlm_loss(out.logits, batch['labels'], batch['attention_mask'])

  def fast(p):
    out = model.apply({'params': p}, batch['input_ids'], batch['attention_mask'])
    return losses.mlm_loss_gathered(p, model.cfg, out.last_hidden_state, batch['labels'],
                                    batch['attention_mask'], max_predictions=k,
                                    groups=groups)
  vg = lambda f: jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  return vg(full), vg(fast)


def _close_trees(a, b, rtol=1e-5, atol=1e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# k rows gathered from each of `groups` groups of sequences: the masked ones / too many masked
# -> every position in passes of k (k = 24 does not divide the 128 tokens: a padded last pass).
@pytest.mark.parametrize('p,k,groups', [(0.15, 32, 1), (0.15, 16, 2), (0.5, 24, 2)])
def test_gathered_mlm_loss_and_grads_equal_full_head(bert, p, k, groups):
  model, params = bert
  batch = _mlm_batch(0, p)
  counts = ((batch['labels'] != -100) & (batch['attention_mask'] > 0)).reshape(groups, -1)
  assert (counts.sum(1).max() <= k) == (p == 0.15)      # both branches exercised
  ((s_full, c_full), g_full), ((s_fast, c_fast), g_fast) = _both_mlm(model, params, batch, k,
                                                                     groups)
  assert float(c_full) == float(c_fast) == counts.sum()
  np.testing.assert_allclose(float(s_fast), float(s_full), rtol=1e-6)
  _close_trees(g_fast, g_full)
  assert float(jnp.abs(g_fast['mlm_transform']['kernel']).sum()) > 0
  # The loss alone (no differentiation) takes the loss-only passes.
  out = model.apply({'params': params}, batch['input_ids'], batch['attention_mask'])
  s_only, _ = jax.jit(lambda p_: losses.mlm_loss_gathered(
      p_, model.cfg, out.last_hidden_state, batch['labels'], batch['attention_mask'],
      max_predictions=k, groups=groups))(params)
  np.testing.assert_allclose(float(s_only), float(s_full), rtol=1e-6)


def test_mlm_groups_follow_the_batch_sharding():
  """One group of sequences per device holding part of the batch (the mesh of the step's
  activation context), so that no device gathers another's rows; 1 outside a mesh."""
  import flax.linen as nn
  from jax.sharding import AbstractMesh

  from oqt_jax.train import sharding as shd
  assert losses.batch_shards(8) == 1
  mesh = AbstractMesh((2, 2, 2), ('data', 'fsdp', 'tensor'))
  with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES):
    assert losses.batch_shards(8) == 4          # data x fsdp; tensor holds whole sequences
    assert losses.batch_shards(6) == 2          # fsdp does not divide 6: batch not split on it


def test_bert_mlm_head_restates_the_model_head(bert):
  model, params = bert
  batch = _mlm_batch(1, 0.15)
  out = model.apply({'params': params}, batch['input_ids'], batch['attention_mask'])
  np.testing.assert_allclose(np.asarray(losses.bert_mlm_head(params, model.cfg,
                                                             out.last_hidden_state)),
                             np.asarray(out.logits), rtol=1e-6, atol=1e-6)


def test_mlm_max_predictions():
  assert losses.mlm_max_predictions(128) == 32
  assert losses.mlm_max_predictions(8) == 8
  assert losses.mlm_max_predictions(512) % 8 == 0 and losses.mlm_max_predictions(512) < 128
  # The benchmark's batch, 16 x 128 tokens: 307 masked on average, 360 rows (not 16 x 32).
  assert losses.mlm_max_predictions(16 * 128) == 360


def _clm_batch(seed):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 97, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[2, :5] = 0                  # left padding
  labels = np.where(mask > 0, ids, -100).astype(np.int32)
  labels[0, 10] = -100
  return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize('chunk_rows', [B * 8, 1])
def test_chunked_clm_loss_and_grads_equal_full_logits(opt, chunk_rows):
  model, params = opt
  batch = _clm_batch(0)

  def full(p):
    out = model.apply({'params': p}, batch['input_ids'], batch['attention_mask'])
    return losses.clm_loss(out.logits, batch['labels'], batch['attention_mask'])

  def fast(p):
    out = model.apply({'params': p}, batch['input_ids'], batch['attention_mask'])
    return losses.clm_loss_chunked(out.last_hidden_state, p['embed_tokens']['embedding'],
                                   batch['labels'], batch['attention_mask'],
                                   chunk_rows=chunk_rows)
  (s_full, c_full), g_full = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
  (s_fast, c_fast), g_fast = jax.jit(jax.value_and_grad(fast, has_aux=True))(params)
  assert float(c_full) == float(c_fast)
  np.testing.assert_allclose(float(s_fast), float(s_full), rtol=1e-6)
  _close_trees(g_fast, g_full)
  # The loss alone (no differentiation) takes the loss-only scan.
  np.testing.assert_allclose(float(jax.jit(fast)(params)[0]), float(s_full), rtol=1e-6)


def test_linear_cross_entropy_matches_torch_autograd():
  rng = np.random.default_rng(3)
  h = rng.normal(size=(2, 12, 8)).astype(np.float32)
  table = rng.normal(size=(50, 8)).astype(np.float32)
  targets = rng.integers(0, 50, (2, 12)).astype(np.int32)
  weights = (rng.random((2, 12)) < 0.7).astype(np.float32)
  f = lambda a, b: 2.0 * losses.linear_cross_entropy_sum(a, b, targets, weights, 3)
  val, (gh, gt) = jax.value_and_grad(f, argnums=(0, 1))(h, table)
  th, tt = torch.tensor(h, requires_grad=True), torch.tensor(table, requires_grad=True)
  ce = torch.nn.functional.cross_entropy((th @ tt.T).reshape(-1, 50),
                                         torch.tensor(targets, dtype=torch.long).reshape(-1),
                                         reduction='none')
  ref = 2.0 * (ce * torch.tensor(weights).reshape(-1)).sum()
  ref.backward()
  np.testing.assert_allclose(float(val), float(ref.detach()), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gh), th.grad.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gt), tt.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_chunked_clm_needs_less_memory_than_full_logits():
  """Compiled temp memory of loss + grads: the chunked head never holds the (B*T, V) logits."""
  b, t, d, v = 8, 64, 32, 4096
  h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  tab = jax.ShapeDtypeStruct((v, d), jnp.float32)
  lab = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def full(h, tab, lab):
    return losses.clm_loss(jnp.einsum('btd,vd->btv', h, tab), lab)[0]

  def chunked(h, tab, lab):
    return losses.clm_loss_chunked(h, tab, lab, chunk_rows=64)[0]
  temp = lambda f: jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, tab, lab).compile() \
      .memory_analysis().temp_size_in_bytes
  logits_bytes = b * t * v * 4
  full_bytes, chunked_bytes = temp(full), temp(chunked)
  assert full_bytes >= logits_bytes
  assert chunked_bytes < logits_bytes / 2 and chunked_bytes < full_bytes / 4, (chunked_bytes, full_bytes)


def test_train_loss_takes_the_plain_path_for_quantized_or_other_heads(bert):
  model, params = bert
  batch = _mlm_batch(2, 0.15)
  out = model.apply({'params': params}, batch['input_ids'], batch['attention_mask'])
  plain = losses.loss_for_head('mlm', out.logits, batch)
  fast = losses.train_loss(model, 'mlm', out, params, batch)
  no_model = losses.train_loss(None, 'mlm', out, params, batch)
  np.testing.assert_allclose(float(fast[0]), float(plain[0]), rtol=1e-6)
  assert float(no_model[0]) == float(plain[0])


def test_eval_num_chunks():
  assert losses.eval_num_chunks(16, 128) == 4          # 512 tokens a chunk
  assert losses.eval_num_chunks(2, 16) == 1
  assert losses.eval_num_chunks(64, 2048) == 8         # unrolled: at most 8
  assert losses.eval_num_chunks(64, 2047) == 1         # 2047 = 23 x 89: no divisor up to 8
  assert losses.eval_num_chunks(4, 32, chunk_rows=32) == 4


def _eval_losses(model, variables, batch):
  full = model.apply(variables, batch['input_ids'], batch['attention_mask'])
  ref = losses.clm_loss(full.logits, batch['labels'], batch['attention_mask'])
  out = model.apply(variables, batch['input_ids'], batch['attention_mask'],
                    loss_labels=batch['labels'])
  return ref, out


def test_eval_lm_loss_by_chunks_equals_the_full_logits_loss(opt, monkeypatch):
  """OPT called with loss_labels: head + loss in 4 chunks of positions, floating point and
  W8A8 with frozen ranges (every point quantized, the LM head and its logits too), equal to the
  loss of the full logits; modes whose quantizers see the whole tensor keep the full head."""
  from oqt_jax import quant
  monkeypatch.setattr(lm_loss, 'CLM_CHUNK_ROWS', B * T // 4)
  model, params = opt
  batch = {k: jnp.asarray(v) for k, v in _clm_batch(3).items()}
  cal = [{k: jnp.asarray(v) for k, v in _clm_batch(s).items()} for s in (4, 5)]
  qcfg = quant.config(n_bits=8, n_bits_act=8, quant_setup='all', est_num_batches=2)
  qmodel, qvars = quant.calibrate(model, {'params': params}, cal, qcfg)
  for mdl, var in ((model, {'params': params}), (qmodel, qvars)):
    ref, out = _eval_losses(mdl, var, batch)
    assert out.logits is None
    assert float(out.lm_loss[1]) == float(ref[1])
    np.testing.assert_allclose(float(out.lm_loss[0]), float(ref[0]), rtol=1e-6)
  # The quantized model's loss differs from the FP one (the head is really quantized).
  assert abs(float(_eval_losses(qmodel, qvars, batch)[1].lm_loss[0])
             - float(_eval_losses(model, {'params': params}, batch)[1].lm_loss[0])) > 1e-4
  dyn = qmodel.clone(quant=qmodel.quant.with_mode('dynamic'))
  ref, out = _eval_losses(dyn, qvars, batch)
  assert out.logits is not None
  np.testing.assert_allclose(float(out.lm_loss[0]), float(ref[0]), rtol=1e-6)
