"""Every experiment config loads, validates, and builds the model of the paper's table."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from oqt_jax import models
from oqt_jax.config import load_config_file, model_config
from oqt_jax.errors import ConfigError
from oqt_jax.models import hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if os.path.basename(p) not in ('__init__.py', 'base.py', 'recipes.py'))
PAPER = {  # layers, d_model, heads, ffn (REFERENCE §1)
    'bert_base': (12, 768, 12, 3072), 'opt_125m': (12, 768, 12, 3072),
    'opt_350m': (24, 1024, 16, 4096), 'opt_1.3b': (24, 2048, 32, 8192),
}


def _name(path):
  return os.path.basename(path)[:-3]


def test_all_table_rows_present():
  names = {_name(p) for p in CONFIGS}
  for row in ('bert_base_vanilla', 'bert_base_clipped_softmax', 'bert_base_gated_attention',
              'opt_125m_vanilla', 'opt_125m_clipped_softmax', 'opt_125m_gated_attention',
              'opt_350m_vanilla', 'opt_350m_gated_attention', 'opt_1.3b_vanilla',
              'opt_1.3b_gated_attention'):
    assert row in names
    if not row.startswith('opt_350m') and not row.startswith('opt_1.3b'):
      assert 'tiny_' + row.split('_', 2)[0] + '_' + row.split('_', 2)[2] in names


def _param_count(cfg):
  model = models.build(cfg)
  shapes = jax.eval_shape(lambda r: models.init_variables(model, r), jax.random.PRNGKey(0))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def _hf_param_count(cfg):
  hf_cfg = hf.config_to_hf(cfg)
  arch = getattr(T, hf_cfg['architectures'][0])
  config_cls = T.BertConfig if cfg.model_type == 'bert' else T.OPTConfig
  with torch.device('meta'):
    m = arch(config_cls.from_dict(hf_cfg))
  return sum(p.numel() for p in m.parameters())   # tied weights counted once


def _gate_param_count(cfg):
  h, d = cfg.num_heads, cfg.head_dim
  per_layer = {
      'none': 0, 'unconditional_per_head': h,
  }.get(cfg.gate)
  if per_layer is None:
    if cfg.gate_linear_all_features:
      per_layer = cfg.hidden_size * h + h
    elif cfg.gate_mlp:
      per_layer = h * (d * (d // 4) + d // 4 + d // 4 + 1)
    elif cfg.gate_mlp2:
      per_layer = h * (d * d + d + d + 1)
    elif cfg.gate == 'elementwise':
      per_layer = cfg.hidden_size * h * d + h * d
    else:
      per_layer = h * (d + 1)
  per_layer += cfg.num_heads if cfg.softmax == 'sink' else 0
  return per_layer * cfg.num_layers


@pytest.mark.parametrize('path', CONFIGS, ids=_name)
def test_config_builds_paper_model(path):
  config = load_config_file(path)
  cfg = model_config(config)
  name = _name(path)
  family = next((f for f in PAPER if name.startswith(f)), None)
  if family:
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == PAPER[family]
  # Parameter count equals the transformers model's (plus exactly the gate parameters).
  assert _param_count(cfg) == _hf_param_count(cfg) + _gate_param_count(cfg)


def test_recipes_match_the_paper():
  c = load_config_file(os.path.join(ROOT, 'configs', 'opt_125m_clipped_softmax.py'))
  assert model_config(c).clip_gamma_zeta == pytest.approx((-12 / 512, 1.0))
  assert (c.learning_rate, c.warmup_steps, c.adam_b2, c.weight_decay, c.decay_layer_norm) == (
      4e-4, 2000, 0.95, 0.1, True)
  assert c.per_device_batch_size * c.gradient_accumulation_steps == 192
  b = load_config_file(os.path.join(ROOT, 'configs', 'bert_base_clipped_softmax.py'))
  assert model_config(b).clip_gamma_zeta == pytest.approx((-0.025, 1.0))
  assert (b.learning_rate, b.warmup_steps, b.per_device_batch_size, b.weight_decay) == (
      1e-4, 10_000, 256, 0.01)
  g = model_config(load_config_file(os.path.join(ROOT, 'configs', 'bert_base_gated_attention.py')))
  assert (g.gate, g.gate_mlp) == ('conditional_per_token', True)
  o = model_config(load_config_file(os.path.join(ROOT, 'configs', 'opt_350m_gated_attention.py')))
  assert (o.gate, o.gate_init, o.do_layer_norm_before, o.embed_dim) == (
      'conditional_per_token', 0.25, True, 768)
  big = model_config(load_config_file(os.path.join(ROOT, 'configs', 'opt_1.3b_gated_attention.py')))
  assert big.gate_linear_all_features


@pytest.mark.parametrize('override,field', [
    ({'model.softmax': 'clipped(0.5:1)'}, 'model.softmax'),
    ({'model.gate': 'conditional'}, 'model.gate'),
    ({'model.num_heads': 7}, 'model.num_heads'),
    ({'model.dtype': 'int8'}, 'model.dtype'),
])
def test_bad_override_fails_naming_the_field(override, field):
  config = load_config_file(os.path.join(ROOT, 'configs', 'tiny_bert_vanilla.py'), override)
  with pytest.raises(ConfigError, match='^' + field.replace('.', r'\.') + '='):
    model_config(config)


def test_missing_config_file():
  with pytest.raises(ConfigError, match='nope.py'):
    load_config_file('configs/nope.py')


def test_tiny_configs_run_forward():
  for name in ('tiny_bert_gated_attention', 'tiny_opt_clipped_softmax'):
    cfg = model_config(load_config_file(os.path.join(ROOT, 'configs', name + '.py')))
    model = models.build(cfg)
    v = models.init_variables(model, jax.random.PRNGKey(0))
    out = jax.jit(model.apply)(v, jnp.ones((2, 16), jnp.int32))
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert np.isfinite(np.asarray(out.logits)).all()
