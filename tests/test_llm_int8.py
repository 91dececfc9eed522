"""LLM.int8() against bitsandbytes itself (its Linear8bitLt and int8 ops on CPU), the int8
storage of the converted weights, the FP head, and whole models against transformers' models
converted with bitsandbytes (the integration's choice of modules to keep)."""
import logging

import bitsandbytes as bnb
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from oqt_jax import quant
from oqt_jax.models import hf
from oqt_jax.quant import weight_int8
from oqt_jax.quant.methods import llm_int8 as li

THRESHOLD = 6.0
logging.getLogger('bitsandbytes').setLevel(logging.ERROR)   # "inputs will be cast to float16"


def rel_err(y, ref):
  return float(np.max(np.abs(np.asarray(y, np.float64) - ref)) / np.max(np.abs(ref)))


def bnb_linear(w, b, threshold=THRESHOLD):
  """bitsandbytes' Linear8bitLt (inference) with the (d_in, d_out) kernel w and bias b."""
  d_in, d_out = w.shape
  lin = bnb.nn.Linear8bitLt(d_in, d_out, bias=b is not None, has_fp16_weights=False,
                            threshold=threshold)
  lin.weight = bnb.nn.Int8Params(torch.tensor(np.ascontiguousarray(w.T)), requires_grad=False,
                                 has_fp16_weights=False)._quantize('cpu')
  if b is not None:
    lin.bias = torch.nn.Parameter(torch.tensor(b), requires_grad=False)
  return lin.eval()      # training mode runs another path on CPU (dequantized weights)


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 1.0, (2, 9, 64)).astype(np.float32)
  x[:, :, 5] *= 12.0                   # an outlier feature in every token
  x[1, 3, 20] = -40.0                  # one in a single token
  x[0, :4, 33] = 7.5                   # in a few tokens
  x[0, 6, 41] = 5.999                  # rounds to 6.0 in float16: an outlier for bitsandbytes
  x[:, :, 7] = np.clip(x[:, :, 7], -5.9, 5.9)
  x[1, 5] = np.clip(x[1, 5], -3.0, 3.0)   # rows entirely below the threshold
  x[1, 6] = np.clip(x[1, 6], -3.0, 3.0)
  w = rng.normal(0, 0.1, (64, 48)).astype(np.float32)
  b = rng.normal(0, 0.5, 48).astype(np.float32)
  return x, w, b


def test_matches_bitsandbytes_linear8bitlt(data):
  x, w, b = data
  fn = jax.jit(li.llm_int8_matmul, static_argnames='return_outliers')
  lin = bnb_linear(w, b)
  with torch.no_grad():
    ref = lin(torch.tensor(x)).numpy().astype(np.float64)
  assert sorted(lin.state.idx.tolist()) == [5, 20, 33, 41]
  y, cols = fn(x, w, THRESHOLD, return_outliers=True, bias=b)
  assert sorted(np.flatnonzero(np.asarray(cols))) == [5, 20, 33, 41]
  # 1/127^2 as the CUDA kernel; bitsandbytes' CPU op multiplies by 6.200124e-05.
  assert rel_err(y, ref) < 1e-4
  assert rel_err(fn(x, w, THRESHOLD, return_outliers=True, bias=b,
                    dequant_const=li.DEFAULT_OP_DEQUANT_CONST)[0], ref) < 1e-6
  # The same from the stored int8 codes; and the test can fail: FP weights in the outlier part,
  # or the row scale taken after zeroing whole outlier columns, are visibly different.
  codes, absmax = li.quantize_weight(w)
  assert rel_err(fn(x, codes, THRESHOLD, return_outliers=True, w_absmax=absmax, bias=b)[0],
                 ref) < 1e-4
  x2 = x.reshape(-1, 64).astype(np.float64)
  c = np.isin(np.arange(64), [5, 20, 33, 41])
  x_in = np.where(c, 0, x).astype(np.float32)
  fp_outliers = (np.asarray(fn(x_in, w, THRESHOLD, return_outliers=True, bias=b)[0])
                 .reshape(-1, 48) + np.where(c, x2, 0) @ w)
  assert rel_err(fp_outliers, ref.reshape(-1, 48)) > 1e-4
  col_scale = (np.asarray(fn(x_in, w, np.inf, return_outliers=True, bias=b)[0]).reshape(-1, 48)
               + np.where(c, x2, 0) @ np.asarray(li.dequantize_weight(codes, absmax)))
  assert rel_err(col_scale, ref.reshape(-1, 48)) > 1e-4


def test_quantizers_equal_bitsandbytes_ops(data):
  x, w, _ = data
  x2 = x.reshape(-1, 64)
  ca, sca, oc = torch.ops.bitsandbytes.int8_vectorwise_quant(torch.tensor(x2).half(), THRESHOLD)
  cx, ax, cols = li.quantize_rows(x2, THRESHOLD)
  np.testing.assert_array_equal(np.asarray(cx), ca.numpy())
  np.testing.assert_array_equal(np.asarray(ax), sca.numpy())
  assert np.flatnonzero(np.asarray(cols)).tolist() == oc.tolist()
  cb, scb, _ = torch.ops.bitsandbytes.int8_vectorwise_quant(torch.tensor(w.T).half(), 0.0)
  cw, aw = li.quantize_weight(w)
  assert cw.dtype == jnp.int8 and aw.shape == (48,)
  np.testing.assert_array_equal(np.asarray(cw).T, cb.numpy())
  np.testing.assert_array_equal(np.asarray(aw), scb.numpy())
  np.testing.assert_array_equal(np.asarray(li.dequantize_weight(cw, aw)).T,
                                torch.ops.bitsandbytes.int8_vectorwise_dequant(cb, scb).numpy())


def test_int8_operands_int32_accumulation_and_padding(data):
  x, w, _ = data
  jaxpr = jax.make_jaxpr(lambda a, b: li.llm_int8_matmul(a, b, THRESHOLD))(x, w).jaxpr
  dots = [e for e in jaxpr.eqns if e.primitive.name == 'dot_general']
  int_dots = [e for e in dots if e.params['preferred_element_type'] == jnp.int32]
  assert len(dots) == 2 and len(int_dots) == 1
  assert [v.aval.dtype for v in int_dots[0].invars] == [jnp.int8, jnp.int8]
  # threshold inf: no outlier dims; a padding token's value makes a dim an outlier unless masked.
  _, cols = li.llm_int8_matmul(x, w, np.inf, return_outliers=True)
  assert not np.any(np.asarray(cols))
  x2 = np.array(x)
  x2[0, 8, 9] = 100.0
  mask = np.ones((2, 9), bool)
  mask[0, 8] = False
  _, cols = li.llm_int8_matmul(x2, w, THRESHOLD, mask=mask, return_outliers=True)
  _, cols_nomask = li.llm_int8_matmul(x2, w, THRESHOLD, return_outliers=True)
  assert not bool(cols[9]) and bool(cols_nomask[9])


# ---- models ------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def hf_models(tmp_path_factory):
  """{'opt': OPTForCausalLM, 'bert': BertForSequenceClassification}: tiny torch models with
  planted outlier dims (two LayerNorm gains of 9, so the Linear inputs there reach |x| >= 6),
  each with our (model, variables) loaded from its saved checkpoint; and the inputs."""
  import transformers
  torch.manual_seed(0)
  cfgs = {'opt': (transformers.OPTForCausalLM, transformers.OPTConfig(
              vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=32, pad_token_id=1,
              activation_function='relu')),
          'bert': (transformers.BertForSequenceClassification, transformers.BertConfig(
              vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=32, num_labels=3))}
  out = {}
  for name, (cls, cfg) in cfgs.items():
    tmodel = cls(cfg).eval()
    with torch.no_grad():
      for n, p in tmodel.named_parameters():
        if n.endswith(('layer_norm.weight', 'LayerNorm.weight')):
          p[[3, 17]] = 9.0
    path = tmp_path_factory.mktemp(name)
    tmodel.save_pretrained(path)
    model, variables = hf.load(path)
    out[name] = (cls, path, model, variables)
  ids = np.random.default_rng(1).integers(2, 96, (2, 12))
  mask = np.ones((2, 12), np.int64)
  mask[1, 9:] = 0
  return out, ids, mask


def _to_bnb(tmodel, keys):
  """transformers' conversion: every nn.Linear but the modules `keys` names (its
  get_keys_to_not_convert) becomes a Linear8bitLt with the checkpoint's weights (what
  from_pretrained(..., load_in_8bit) builds)."""
  from transformers.quantizers.quantizers_utils import should_convert_module
  for name, mod in list(tmodel.named_modules()):
    if type(mod) is torch.nn.Linear and should_convert_module(name, keys):
      tmodel.set_submodule(name, bnb_linear(mod.weight.detach().numpy().T,
                                            None if mod.bias is None
                                            else mod.bias.detach().numpy()))
  return tmodel.eval()


def test_whole_model_vs_transformers_bitsandbytes(hf_models):
  """A tiny OPT against transformers' model converted with bitsandbytes, on the same checkpoint:
  as the integration decides (the tied LM head FP) and with the head converted too
  (llm_int8_skip_modules=[] there, keep_head_fp=False here)."""
  from transformers.quantizers.base import get_keys_to_not_convert
  (cls, path, model, variables), ids, mask = hf_models[0]['opt'], *hf_models[1:]
  inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  valid = mask.astype(bool)
  tmodel = cls.from_pretrained(path, attn_implementation='eager').eval()
  with torch.no_grad():
    fp = tmodel(**inputs).logits.numpy()[valid]
    ref = _to_bnb(tmodel, get_keys_to_not_convert(tmodel))(**inputs).logits.numpy()[valid]
    assert type(tmodel.lm_head) is torch.nn.Linear
    int8_mods = [m for m in tmodel.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert any(len(m.state.idx) for m in int8_mods)    # the planted dims are outliers
    tmodel = _to_bnb(cls.from_pretrained(path, attn_implementation='eager'), [])
    assert isinstance(tmodel.lm_head, bnb.nn.Linear8bitLt)
    assert type(tmodel.model.decoder.embed_tokens) is torch.nn.Embedding
    ref_head = tmodel(**inputs).logits.numpy()[valid]
  _, qvars = li.llm_int8(model, variables, THRESHOLD)
  int8_leaves = [l for l in jax.tree_util.tree_leaves(qvars['params']) if l.dtype == jnp.int8]
  assert len(int8_leaves) == len(int8_mods) == 12
  assert 'embed_tokens' not in qvars[weight_int8.SCALES]            # the head stays FP
  qmodel, qv2 = li.llm_int8(model, variables, THRESHOLD, keep_head_fp=False,
                            dequant_const=li.DEFAULT_OP_DEQUANT_CONST)
  head = qv2[weight_int8.SCALES]['embed_tokens']
  assert head[li.HEAD_CODES].dtype == jnp.int8 and head[li.HEAD_CODES].shape == (32, 96)
  assert weight_int8.param_bytes(qv2) == weight_int8.param_bytes(qvars) + 96 * 32 + 96 * 4
  out = jax.jit(lambda v: qmodel.apply(v, ids, attention_mask=mask))(qv2)
  # Bit for bit but for float32 summation order. (With the default 1/127^2 of the CUDA kernel,
  # 1.8e-5 below the CPU op's constant, a few codes of later layers round the other way: ~2e-3.)
  assert rel_err(np.asarray(out.logits)[valid], ref_head) < 1e-5
  # The same body with the FP head (the layers do not depend on the head's setting).
  h = np.asarray(out.last_hidden_state, np.float64)[valid]
  y = h @ np.asarray(variables['params']['embed_tokens']['embedding'], np.float64).T
  assert rel_err(y, ref) < 1e-5 and rel_err(fp, ref) > 1e-3


def test_converted_modules_as_transformers(hf_models):
  """BERT with a classifier: the Linears transformers converts (its get_keys_to_not_convert)
  are the int8 kernels of llm_int8. transformers 5.x names the last module 'classifier.bias',
  which matches no module, so it converts the classifier (keep_head_fp=False); 4.x strips
  '.bias' and keeps it FP (keep_head_fp=True, the default)."""
  from transformers.quantizers.base import get_keys_to_not_convert
  from transformers.quantizers.quantizers_utils import should_convert_module
  (cls, path, model, variables) = hf_models[0]['bert']
  tmodel = cls.from_pretrained(path)
  keys = get_keys_to_not_convert(tmodel)
  names = {'query': 'attention.self.query', 'key': 'attention.self.key',
           'value': 'attention.self.value', 'out': 'attention.output.dense',
           'intermediate': 'intermediate.dense', 'output': 'output.dense'}

  def hf_name(path):
    if path[0].startswith('encoder_layer_'):
      return f'bert.encoder.layer.{path[0].rsplit("_", 1)[1]}.{names[path[-2]]}'
    return {'pooler': 'bert.pooler.dense', 'classifier': 'classifier'}[path[0]]

  linears = [n for n, m in tmodel.named_modules() if type(m) is torch.nn.Linear]
  for keep_head_fp, k in ((True, keys + [x.removesuffix('.bias') for x in keys]), (False, keys)):
    _, qvars = li.llm_int8(model, variables, keep_head_fp=keep_head_fp)
    flat = jax.tree_util.tree_flatten_with_path(qvars['params'])[0]
    ours = {hf_name([p.key for p in path]) for path, l in flat if l.dtype == jnp.int8}
    assert ours == {n for n in linears if should_convert_module(n, k)}
    assert ('classifier' in ours) == (not keep_head_fp) and 'bert.pooler.dense' in ours


def test_head_fp_by_default_int8_storage_and_bytes(hf_models):
  (_, _, model, variables), ids, mask = hf_models[0]['bert'], *hf_models[1:]
  qmodel, qvars = quant.llm_int8(model, variables)
  p = qvars['params']
  assert p['classifier']['kernel'].dtype == jnp.float32              # the head stays FP
  assert p['pooler']['kernel'].dtype == jnp.int8
  assert p['encoder_layer_0']['attention']['query']['kernel'].dtype == jnp.int8
  assert p['word_embeddings']['embedding'].dtype == jnp.float32      # embeddings not converted
  s = qvars[weight_int8.SCALES]['encoder_layer_0']['output'][li.SCALE_NAME]
  assert s.dtype == jnp.float32 and s.shape == (32,)
  before, after = weight_int8.param_bytes(variables), weight_int8.param_bytes(qvars)
  n8 = sum(l.size for l in jax.tree_util.tree_leaves(p) if l.dtype == jnp.int8)
  n_scale = sum(l.size for l in jax.tree_util.tree_leaves(qvars[weight_int8.SCALES]))
  assert n8 == 4 * 32 * 32 + 2 * 32 * 64 + 32 * 32 and n_scale == 5 * 32 + 64 + 32
  assert after == before - 3 * n8 + 4 * n_scale
  # The head in FP: the logits are the FP classifier applied to the int8 model's pooled output.
  out, state = jax.jit(lambda v: qmodel.apply(v, ids, attention_mask=mask,
                                              mutable=['intermediates']))(qvars)
  c = variables['params']['classifier']
  np.testing.assert_allclose(np.asarray(out.logits),
                             np.asarray(out.pooler_output) @ c['kernel'] + c['bias'], rtol=1e-5,
                             atol=1e-6)
  sown = jax.tree_util.tree_flatten_with_path(state['intermediates'])[0]
  fr = {tuple(k.key for k in path[:-2]): float(v) for path, v in sown
        if path[-2].key == li.SOW_NAME}
  assert len(fr) == 7 and 0 < max(fr.values()) < 1 and ('classifier',) not in fr
  qm2, qv2 = li.llm_int8_method(model, variables, None,
                                {'llm_int8_threshold': 5.0, 'llm_int8_keep_head_fp': False})
  assert qv2['params']['classifier']['kernel'].dtype == jnp.int8
  assert qm2.quant.threshold == 5.0 and weight_int8.param_bytes(qv2) < after
  assert li.PRESET == {'llm_int8_threshold': 6.0}


def test_registry_entries_and_threshold_validation():
  from oqt_jax.errors import ConfigError
  from oqt_jax.quant import methods
  assert {'llm_int8', 'weight_only'} <= set(methods.names())
  with pytest.raises(ConfigError, match=r'^quant\.llm_int8_threshold'):
    quant.config(llm_int8_threshold=0.0)
  with pytest.raises(ConfigError, match=r'^quant\.weight_only'):
    quant.config(weight_only='yes')
