"""LLM.int8(): the decomposition against a numpy restatement, its error bounds, the int8
matmul, and the models' LLM.int8() mode (outlier fractions per layer)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oqt_jax import models, quant
from oqt_jax.quant.methods import llm_int8 as li

THRESHOLD = 6.0


def np_llm_int8(x, w, threshold):
  """Outlier columns of X in floating point, the rest int8 with absmax per row of X and per
  column of W, summed (float64)."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  w = np.asarray(w, np.float64)
  cols = np.any(np.abs(x) >= threshold, axis=0)
  y_fp = x[:, cols] @ w[cols, :]
  xr = np.where(cols[None, :], 0.0, x)
  ax = np.max(np.abs(xr), axis=1, keepdims=True)
  sx = 127 / np.where(ax > 0, ax, 127.0)
  sw = 127 / np.max(np.abs(w), axis=0, keepdims=True)
  y_int = np.round(sx * xr) @ np.round(sw * w)
  return y_fp + y_int / (sx * sw), cols, sx, sw


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 1.0, (2, 9, 32)).astype(np.float32)
  x[:, :, 5] *= 12.0                   # an outlier feature in every token
  x[1, 3, 20] = -40.0                  # one in a single token
  x[:, :, 7] = np.clip(x[:, :, 7], -5.9, 5.9)
  w = rng.normal(0, 0.1, (32, 24)).astype(np.float32)
  return x, w


def test_decomposition_matches_numpy(data):
  x, w = data
  y, cols = jax.jit(li.llm_int8_matmul, static_argnames='return_outliers')(
      x, w, THRESHOLD, return_outliers=True)
  ref, ref_cols, _, _ = np_llm_int8(x, w, THRESHOLD)
  assert np.array_equal(np.asarray(cols), ref_cols)
  assert set(np.flatnonzero(ref_cols)) == {5, 20}
  np.testing.assert_allclose(np.asarray(y).reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


def test_outlier_columns_exact_and_the_rest_within_int8_error(data):
  x, w = data
  cols = np.zeros(32, bool)
  cols[[5, 20]] = True
  # Only outlier columns: the result is the floating-point product.
  x_out = np.where(cols, x, 0.0).astype(np.float32)
  exact = np.asarray(li.llm_int8_matmul(x_out, w, THRESHOLD))
  np.testing.assert_allclose(exact, np.einsum('bti,io->bto', x_out.astype(np.float64), w),
                             rtol=1e-6, atol=1e-6)
  # Plain int8 on the same input is visibly worse (the outliers dominate every row's scale).
  plain = np.asarray(li.llm_int8_matmul(x, w, np.inf))
  y = np.asarray(li.llm_int8_matmul(x, w, THRESHOLD))
  fp = np.einsum('bti,io->bto', x.astype(np.float64), w)
  assert np.max(np.abs(y - fp)) < 0.5 * np.max(np.abs(plain - fp))
  # The int8 part's error: |x_hat w_hat - x w| <= sum_j |x| e_w + |w| e_x + e_x e_w with
  # e_x = 0.5 / s_x (per row), e_w = 0.5 / s_w (per column).
  _, _, sx, sw = np_llm_int8(x, w, THRESHOLD)
  xr = np.where(cols, x, 0.0)
  xr = np.where(cols, 0.0, x).reshape(-1, 32).astype(np.float64)
  ex, ew = 0.5 / sx, 0.5 / sw
  bound = np.abs(xr) @ np.broadcast_to(ew, w.shape) + ex * np.sum(np.abs(w), 0) + ex * ew * 32
  assert np.all(np.abs(y.reshape(-1, 24) - fp.reshape(-1, 24)) <= bound + 1e-5)


def test_threshold_inf_is_plain_vector_wise_int8(data):
  x, w = data
  y = np.asarray(li.llm_int8_matmul(x, w, np.inf)).reshape(-1, 24)
  x2 = x.reshape(-1, 32).astype(np.float64)
  sx = 127 / np.max(np.abs(x2), axis=1, keepdims=True)
  sw = 127 / np.max(np.abs(w), axis=0, keepdims=True)
  ref = (np.round(sx * x2) @ np.round(sw * w)) / (sx * sw)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, np.asarray(li.int8_vectorwise_matmul(x2, w)), rtol=1e-6)


def test_int8_operands_int32_accumulation_and_padding(data):
  x, w = data
  jaxpr = jax.make_jaxpr(lambda a, b: li.llm_int8_matmul(a, b, THRESHOLD))(x, w).jaxpr
  dots = [e for e in jaxpr.eqns if e.primitive.name == 'dot_general']
  int_dots = [e for e in dots if e.params['preferred_element_type'] == jnp.int32]
  assert len(dots) == 2 and len(int_dots) == 1
  assert [v.aval.dtype for v in int_dots[0].invars] == [jnp.int8, jnp.int8]
  # A padding token's huge value does not make its dim an outlier for the valid tokens.
  x2 = np.array(x)
  x2[0, 8, 9] = 100.0
  mask = np.ones((2, 9), bool)
  mask[0, 8] = False
  _, cols = li.llm_int8_matmul(x2, w, THRESHOLD, mask=mask, return_outliers=True)
  _, cols_nomask = li.llm_int8_matmul(x2, w, THRESHOLD, return_outliers=True)
  assert not bool(cols[9]) and bool(cols_nomask[9])


@pytest.fixture(scope='module')
def tiny_opt():
  cfg = models.ModelConfig(model_type='opt', vocab_size=96, hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=64, max_position_embeddings=32,
                           pad_token_id=1)
  model = models.build(cfg)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 2, 96)
  return model, variables, {'input_ids': np.asarray(ids),
                            'attention_mask': np.ones((2, 12), np.int32)}


def test_models_llm_int8_mode_and_outlier_fractions(tiny_opt):
  model, variables, batch = tiny_opt
  fp = model.apply(variables, batch['input_ids']).logits
  for t, expect in ((1e-9, 1.0), (np.inf, 0.0)):
    qmodel, qvars = quant.llm_int8(model, variables, threshold=t)
    fr = li.outlier_fractions(qmodel, qvars, [batch, batch])
    assert len(fr) == 12 and all(v == expect for v in fr.values()), fr   # every Linear
    q = qmodel.apply(qvars, batch['input_ids']).logits
    err = float(jnp.max(jnp.abs(q - fp)))
    if t < 1:     # every dim an outlier: the floating-point model
      assert err < 1e-5
    else:         # all int8: close, not equal
      assert 0 < err < 0.05 * float(jnp.max(jnp.abs(fp)))
  # Intermediate threshold: some dims of the FFN-output's input (post-ReLU) are outliers.
  qmodel, qvars = li.llm_int8_method(model, variables, [batch],
                                     quant.config(llm_int8_threshold=0.05))
  fr = li.outlier_fractions(qmodel, qvars, [batch])
  assert 0 < np.mean(list(fr.values())) < 1
  assert qmodel.quant.threshold == 0.05


def test_registry_entries_and_threshold_validation():
  from oqt_jax.errors import ConfigError
  assert set(li.METHODS) == {'llm_int8', 'weight_only'}
  with pytest.raises(ConfigError, match=r'^quant\.llm_int8_threshold'):
    quant.config(llm_int8_threshold=0.0)
  with pytest.raises(ConfigError, match=r'^quant\.weight_only'):
    quant.config(weight_only='yes')
