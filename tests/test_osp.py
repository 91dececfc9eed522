"""Outlier-Safe Pre-training's recipe (Park et al., 2025): the single-scale RMSNorm against the
formula, Muon on the hidden matrices exactly as optax.contrib.muon computes it alone (AdamW on
the rest, exactly optax.adamw), the HF round trip, the config errors, and a tiny training run
with both (recipes.outlier_safe)."""
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from optax import contrib

from oqt_jax import models
from oqt_jax.config import load_config_file, model_config, validate
from oqt_jax.errors import ConfigError
from oqt_jax.models import hf
from oqt_jax.models.layers import LayerNorm
from oqt_jax.train import metrics, testing
from oqt_jax.train.optimizer import MUON_BETA, MUON_RMS, make_optimizer, muon_labels
from oqt_jax.train.loop import train_and_evaluate

SMALL = dict(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
             max_position_embeddings=24)


def _model(model_type, **kw):
  eps = {'layer_norm_eps': 1e-5} if model_type == 'opt' else {}   # what an OPT config.json says
  cfg = models.ModelConfig(model_type=model_type, **dict(SMALL, **eps, **kw))
  model = models.build(cfg)
  return model, models.init_variables(model, jax.random.PRNGKey(3))


def test_ssnorm_is_x_over_rms_times_one_scalar():
  x = np.random.RandomState(0).randn(3, 5, 16).astype(np.float32) * 7 + 2
  ln = LayerNorm(point='a0', eps=1e-5, kind='ssnorm')
  v = ln.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(np.shape, flax.linen.meta.unbox(v['params'])) == {'scale': ()}
  v = {'params': {'scale': jnp.float32(1.7)}}
  y = np.asarray(ln.apply(v, x))
  ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5) * 1.7
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  # no mean subtraction and no per-channel gain: scaling one channel changes every output
  x2 = x.copy()
  x2[..., 3] *= 10
  assert not np.allclose(np.asarray(ln.apply(v, x2))[..., 0], y[..., 0])


@pytest.mark.parametrize('model_type', ['opt', 'bert'])
def test_every_norm_of_the_model_is_single_scale(model_type):
  _, v = _model(model_type, norm='ssnorm')
  flat = flax.traverse_util.flatten_dict(v['params'])
  norms = {k: x for k, x in flat.items() if len(k) > 1 and k[-2].endswith(('ln', 'LayerNorm'))}
  assert norms and all(x.shape == () and k[-1] == 'scale' for k, x in norms.items())


def _opt_config(**kw):
  return ml_collections.ConfigDict(dict(dict(
      learning_rate=3e-3, warmup_steps=0, num_train_steps=10, lr_schedule='constant',
      max_grad_norm=0.0, adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8, weight_decay=0.1,
      decay_layer_norm=False, optimizer='muon'), **kw))


def test_muon_on_hidden_matrices_adamw_on_the_rest_as_the_libraries_compute_them():
  _, v = _model('opt', norm='ssnorm', gate='conditional_per_token')
  params = v['params']
  labels = flax.traverse_util.flatten_dict(muon_labels(params))
  muon_keys = {k for k, l in labels.items() if l == 'muon'}
  assert {k[-2] for k in muon_keys} == {'query', 'key', 'value', 'out', 'fc1', 'fc2'}
  assert all(k[-1] == 'kernel' for k in muon_keys)
  assert labels[('embed_tokens', 'embedding')] == 'adamw'
  assert labels[('decoder_layer_0', 'attention', 'gate', 'kernel')] == 'adamw'

  tx, _ = make_optimizer(_opt_config(), params)
  rs = np.random.RandomState(1)
  grads = [jax.tree.map(lambda p: jnp.asarray(rs.randn(*p.shape), jnp.float32), params)
           for _ in range(3)]
  state, p = tx.init(params), params
  # the references: the libraries alone, each on its own part
  kernel = ('decoder_layer_1', 'fc1', 'kernel')
  ref_muon = contrib.muon(3e-3, beta=MUON_BETA, weight_decay=0.1, consistent_rms=MUON_RMS,
                          muon_weight_dimension_numbers=contrib.MuonDimensionNumbers())
  emb = ('embed_tokens', 'embedding')
  ref_adam = optax.adamw(3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  get = lambda t, k: flax.traverse_util.flatten_dict(t)[k]
  rk, re = get(params, kernel), get(params, emb)
  rk_state, re_state = ref_muon.init(rk), ref_adam.init(re)
  step = lambda t: jax.jit(lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(
      *t.update(g, s, p)))
  ours, muon_alone, adam_alone = step(tx), step(ref_muon), step(ref_adam)
  for g in grads:
    p, state = ours(g, state, p)
    rk, rk_state = muon_alone(get(g, kernel), rk_state, rk)
    re, re_state = adam_alone(get(g, emb), re_state, re)
  np.testing.assert_allclose(get(p, kernel), rk, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(get(p, emb), re, rtol=1e-6, atol=1e-7)
  # Muon's update is an orthogonalised matrix: with no decay, all singular values ~ equal
  tx0, _ = make_optimizer(_opt_config(weight_decay=0.0), params)
  u, _ = jax.jit(tx0.update)(grads[0], tx0.init(params), params)
  s = np.linalg.svd(np.asarray(get(u, kernel)), compute_uv=False)
  s = s / (3e-3 * MUON_RMS * np.sqrt(max(get(u, kernel).shape)))
  assert 0.5 < s.min() and s.max() < 1.3, s      # Newton-Schulz's band around 1


def test_muon_needs_params_and_bad_fields_name_themselves():
  with pytest.raises(ValueError, match='muon'):
    make_optimizer(_opt_config())
  c = load_config_file(os.path.join(testing.REPO_ROOT, 'configs/tiny_opt_vanilla.py'),
                       {'optimizer': 'sgd'})
  with pytest.raises(ConfigError, match="optimizer='sgd'"):
    validate(c)
  c = load_config_file(os.path.join(testing.REPO_ROOT, 'configs/tiny_opt_vanilla.py'),
                       {'model.norm': 'rms'})
  with pytest.raises(ConfigError, match="model.norm='rms'"):
    model_config(c)
  with pytest.raises(ConfigError, match='single-scale'):
    models.ModelConfig(model_type='opt', norm='ssnorm', gamma_migrated=True).validate()


@pytest.mark.parametrize('model_type', ['opt', 'bert'])
def test_hf_round_trip_keeps_the_scalars(tmp_path, model_type):
  model, v = _model(model_type, norm='ssnorm')
  v = {'params': jax.tree.map(lambda x: x * 1.3 if x.ndim == 0 else x, v['params'])}
  hf.save(model, v, tmp_path)
  model2, v2 = hf.load(str(tmp_path))
  assert model2.cfg.norm == 'ssnorm'
  ids = np.array([[2, 5, 7, 9, 11, 3]], np.int32)
  a = model.apply(v, ids, attention_mask=np.ones_like(ids)).logits
  b = model2.apply(v2, ids, attention_mask=np.ones_like(ids)).logits
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_outlier_safe_recipe_trains_and_resumes(tmp_path):
  """The Muon state (optax.multi_transform partitions) is checkpointed and restored: a run
  stopped at step 4 and resumed equals the uninterrupted run, step for step."""
  from configs import recipes

  def cfg(steps):
    base = load_config_file(os.path.join(testing.REPO_ROOT, 'configs/tiny_opt_vanilla.py'),
                            dict(testing.TINY_OVERRIDES, num_train_steps=steps, log_every_steps=1,
                                 eval_every_steps=0, num_eval_batches=1, checkpoint_every_steps=4,
                                 lr_schedule='constant', warmup_steps=0))
    return recipes.outlier_safe(base)
  assert cfg(1).optimizer == 'muon' and cfg(1).model.norm == 'ssnorm'
  whole = train_and_evaluate(cfg(6), str(tmp_path / 'whole'), progress=False)
  train_and_evaluate(cfg(4), str(tmp_path / 'parts'), progress=False)
  parts = train_and_evaluate(cfg(6), str(tmp_path / 'parts'), progress=False)
  assert np.isfinite(whole['eval']['eval_loss'])
  assert parts['eval']['eval_loss'] == whole['eval']['eval_loss']
  loss = lambda d: {s: r['loss'] for s, r in metrics.read_metrics(str(d)).items()}
  assert loss(tmp_path / 'parts')[6] == loss(tmp_path / 'whole')[6]
  model, v = hf.load(os.path.join(tmp_path, 'whole', 'hf'))
  assert model.cfg.norm == 'ssnorm'
  scales = [x for x in jax.tree.leaves(v['params']) if x.ndim == 0]
  assert scales and any(abs(float(s) - 1.0) > 1e-6 for s in scales)   # the scalars learned


def test_methods_on_a_single_scale_model_run_or_say_why_not():
  from oqt_jax.quant import methods
  model, v = _model('opt', norm='ssnorm', num_layers=1)
  rs = np.random.RandomState(0)
  batches = [dict(input_ids=rs.randint(3, 40, (4, 12)).astype(np.int32),
                  attention_mask=np.ones((4, 12), np.int32)) for _ in range(2)]
  qmodel, qv, _ = methods.run('w8a8_minmax', model, v, batches)
  assert np.isfinite(np.asarray(qmodel.apply(qv, **batches[0]).logits)).all()
  for name in ('smoothquant', 'outlier_suppression'):
    with pytest.raises(ConfigError, match="model.norm='ssnorm'"):
      methods.run(name, model, v, batches)
