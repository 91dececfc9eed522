"""The config is validated once, at the door: train.py's and eval.py's paths check every quant
field once and hand the layers below a read-only resolved QuantConfig, which nothing below
checks again (calibration, every registered method, the hooks and rules)."""
import sys

import numpy as np
import pytest

from configs import base
from oqt_jax import models, quant
from oqt_jax.config import resolve
from oqt_jax.errors import ConfigError
from oqt_jax.evaluate import run
from oqt_jax.quant import methods, points
from oqt_jax.train import testing

V, P, B, T = 40, 16, 2, 8


@pytest.fixture(scope='module')
def tiny():
  return testing.tiny_opt(V, P)


def _batches(n=2):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    ids = rng.integers(2, V, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    out.append({'input_ids': ids, 'attention_mask': mask,
                'labels': np.where(mask > 0, ids, -100)})
  return out


class Validations:
  """Counts the calls of points.validate_quant_config, under any module-level name it was
  imported as (every loaded module's reference is swapped for a counting wrapper)."""

  def __init__(self):
    self.n = 0

  def __enter__(self):
    real = points.validate_quant_config

    def counting(config):
      self.n += 1
      return real(config)
    self._swapped = [(m, k) for m in list(sys.modules.values()) for k, v in
                     list(getattr(m, '__dict__', {}).items()) if v is real]
    for m, k in self._swapped:
      setattr(m, k, counting)
    self._real = real
    return self

  def __exit__(self, *exc):
    for m, k in self._swapped:
      setattr(m, k, self._real)


def test_resolved_config_is_read_only_and_copies_stay_resolved():
  q = quant.resolved(quant.config(n_bits=6))
  assert isinstance(q, quant.QuantConfig) and q.n_bits == 6
  assert quant.resolved(q) is q
  with pytest.raises(TypeError, match='read-only'):
    q.n_bits = 4
  with q.unlocked(), pytest.raises(TypeError, match='read-only'):
    q['n_bits'] = 4
  c = q.copy_and_resolve_references()
  assert points.is_resolved(c) and c.to_dict() == q.to_dict()
  with Validations() as v:
    d = points.derive(q, ranges_weights='mse')    # a method's own change (AdaRound's)
  assert v.n == 0
  assert d.ranges_weights == 'mse' and q.ranges_weights != 'mse' and points.is_resolved(d)
  full = base.get_config()
  full.quant.n_bits = 99
  with pytest.raises(ConfigError, match=r'^quant.n_bits=99: expected an integer bit width'):
    quant.resolved(full)
  full.quant.n_bits = 4
  assert quant.resolved(full).n_bits == 4          # a full config: its quant section
  plain = quant.config()
  assert not points.is_resolved(plain)
  plain.n_bits = 5                                 # quant.config() stays a mutable ConfigDict


def test_train_door_resolves_the_quant_section_once():
  c = base.get_config()
  with Validations() as v:
    r = resolve(c)
  assert v.n == 1 and points.is_resolved(r.quant)
  assert r.quant.to_dict() == c.quant.to_dict()
  assert not points.is_resolved(c.quant)           # the caller's config is left as it was
  with Validations() as v:
    quant.hooks(r.quant, models.ModelConfig(model_type='opt', num_layers=1, hidden_size=16,
                                            num_heads=2, intermediate_size=32,
                                            max_position_embeddings=P, vocab_size=V))
  assert v.n == 0
  c.quant.quant_setup = 'nope'
  with pytest.raises(ConfigError, match="^quant.quant_setup='nope'"):
    resolve(c)


@pytest.mark.parametrize('name', ['', 'peg', 'smoothquant'])
def test_methods_take_a_resolved_config_without_checking_it_again(tiny, name):
  model, variables = tiny
  with Validations() as v:
    q = methods.resolve(name, base.get_config().quant, explicit=[], batch_size=B)
  assert v.n == 1 and points.is_resolved(q)
  with Validations() as v:
    _, qvars, info = methods.run(name, model, variables, _batches(1), q)
  assert v.n == 0, name
  assert info['qcfg'].to_dict() == dict(q.to_dict(), est_num_batches=1)
  assert 'quant' in qvars


class _Val:
  def num_eval_batches(self, batch_size):
    return 1

  def eval_batches(self, batch_size, num_batches=None):
    return iter(_batches(1))


class _Cal:
  def batch(self, step, batch_size):
    return _batches(step + 1)[step]


@pytest.mark.parametrize('method', ['', 'smoothquant'])
def test_evaluate_run_validates_quant_once(tmp_path, tiny, monkeypatch, method):
  monkeypatch.setattr(run, 'load_model', lambda *a, **k: (*tiny, 'tiny'))
  monkeypatch.setattr(run, 'datasets', lambda *a, **k: (_Val(), _Cal()))
  c = base.get_config()
  c.model.model_type = 'opt'
  c.quant.method = method
  c.quant.est_num_batches = 1
  with Validations() as v:
    res = run.evaluate_run(c, str(tmp_path), quantize=True, plots_on=False, progress=False,
                           explicit_quant=['est_num_batches'])
  assert v.n == 1
  assert res['quantized']['quant_config']['method'] == method
  c.quant.n_bits_act = 1
  with pytest.raises(ConfigError, match='^quant.n_bits_act=1'):
    run.evaluate_run(c, str(tmp_path), quantize=True, plots_on=False, progress=False,
                     explicit_quant=['n_bits_act'])


def test_every_method_resolves_and_passes_the_model_checks(tiny):
  """Each registered method's resolved config (its preset) is checked on a model once, at the
  door, by tracing the calibration's first pass abstractly."""
  model, variables = tiny
  c = base.get_config()
  c.model.model_type = 'opt'
  for name in methods.names():
    c.quant.method = name
    q = run.resolve_quant(c, (), B, 'opt')
    assert q.method == name and points.is_resolved(q)
    with Validations() as v:
      run.check_quant_for_model(q, model, variables)
    assert v.n == 0, name
