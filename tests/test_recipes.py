"""The OPT-350m / OPT-1.3B recipes as the originals build them, the torch_default init in the
recipes, and the OPT evaluation's running percentile (running_minmax + percentile)."""
import os

import jax
import numpy as np
import pytest
import torch
import transformers as T

from oqt_jax import models, quant
from oqt_jax.config import load_config_file, model_config
from oqt_jax.errors import ConfigError
from oqt_jax.quant import estimators as E
from oqt_jax.quant.points import Rules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The fields the originals' model_configs/*.yaml set on top of OPTConfig() (REFERENCE §1).
ORIGINAL_YAML = {
    'opt_350m': dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     ffn_dim=4096, max_position_embeddings=1024),
    'opt_1.3b': dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                     ffn_dim=8192, max_position_embeddings=1024),
}


def _original_hf_count(yaml: dict) -> int:
  """OPTForCausalLM built as the originals do: OPTConfig() defaults, then the yaml fields."""
  c = T.OPTConfig()
  for k, v in yaml.items():
    setattr(c, k, v)
  with torch.device('meta'):
    m = T.OPTForCausalLM(c)
  assert c.word_embed_proj_dim == 768 and c.do_layer_norm_before
  return sum(p.numel() for p in m.parameters())      # the tied LM head counted once


def _count(cfg, exclude_gates=True) -> int:
  model = models.build(cfg)
  shapes = jax.eval_shape(lambda r: models.init_variables(model, r), jax.random.PRNGKey(0))
  return sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(shapes)[0]
             if not (exclude_gates and 'gate' in jax.tree_util.keystr(p)))


@pytest.mark.parametrize('family', ['opt_350m', 'opt_1.3b'])
@pytest.mark.parametrize('variant', ['vanilla', 'gated_attention'])
def test_opt_recipes_equal_the_originals_models(family, variant):
  config = load_config_file(os.path.join(ROOT, 'configs', f'{family}_{variant}.py'))
  cfg = model_config(config)
  assert cfg.do_layer_norm_before and cfg.embed_dim == 768
  assert cfg.max_position_embeddings == 1024 and cfg.attention_init == 'torch_default'
  assert config.decay_layer_norm is False
  assert (config.quant.ranges_acts, config.quant.percentile) == ('running_minmax', 99.999)
  assert _count(cfg) == _original_hf_count(ORIGINAL_YAML[family])


def test_opt_350m_is_not_the_hub_checkpoint_layout():
  cfg = model_config(load_config_file(os.path.join(ROOT, 'configs', 'opt_350m_vanilla.py')))
  hub = T.OPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                    word_embed_proj_dim=512, do_layer_norm_before=False)
  with torch.device('meta'):
    n_hub = sum(p.numel() for p in T.OPTForCausalLM(hub).parameters())
  assert _count(cfg) != n_hub


def test_paper_recipes_use_torch_default_attention_init():
  for name in ('bert_base_vanilla', 'opt_125m_gated_attention', 'tiny_opt_vanilla'):
    c = load_config_file(os.path.join(ROOT, 'configs', name + '.py'))
    assert c.model.attention_init == 'torch_default', name


# ---- running_minmax + percentile --------------------------------------------------------------
def test_running_minmax_with_percentile_is_an_ema_of_batch_percentiles():
  qcfg = quant.config(ranges_acts='running_minmax', percentile=99.0, momentum=0.9)
  mcfg = models.ModelConfig(model_type='opt', hidden_size=16, num_heads=2, intermediate_size=32,
                            num_layers=1, vocab_size=10, max_position_embeddings=8).validate()
  rules = Rules.build(qcfg, mcfg)
  spec = rules.spec('h0')
  assert spec.estimator == 'percentile' and rules.percentile == 99.0
  rng = np.random.default_rng(0)
  state = E.init_state(())
  want = None
  for _ in range(3):
    x = rng.standard_t(3, size=(4, 50, 16)).astype(np.float32)
    state = E.update(spec.estimator, state, x, momentum=rules.momentum,
                     percentile=rules.percentile)
    lo, hi = np.percentile(x.astype(np.float64), (1.0, 99.0))   # numpy restatement
    want = np.array([lo, hi]) if want is None else 0.1 * np.array([lo, hi]) + 0.9 * want
  np.testing.assert_allclose([float(state['x_min']), float(state['x_max'])], want, rtol=1e-4)
  # Without a percentile running_minmax stays an EMA of min / max.
  plain = Rules.build(quant.config(ranges_acts='running_minmax'), mcfg)
  assert plain.spec('h0').estimator == 'running_minmax'


@pytest.mark.parametrize('kw', [dict(ranges_acts='current_minmax', percentile=99.9),
                                dict(ranges_acts='mse', ranges_weights='mse', percentile=99.9),
                                dict(ranges_acts='allminmax', percentile=99.99)])
def test_meaningless_percentile_is_an_error_naming_the_fields(kw):
  with pytest.raises(ConfigError, match=r'^quant\.percentile=.*quant\.ranges_acts=.*'
                                        r'quant\.ranges_weights='):
    quant.config(**kw)
