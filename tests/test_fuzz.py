"""Fuzzing what a user can hand train.py / eval.py: config values of every section, softmax and
gate strings, quant_dict strings and dicts, command-line overrides, token ids out of range,
sequences longer than the position table, empty evaluation sets and all-padding batches. Each
input gives a defined result or one line naming the field; nothing else may escape.

Most examples stop at validation (no model is built); the few that run a model reuse one
jitted function with fixed shapes, so nothing recompiles per example."""
import math
import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import base
from oqt_jax.config import parse_cli_flags, validate
from oqt_jax.errors import CheckpointError, ConfigError, DataError
from oqt_jax.evaluate import checks, outliers, run
from oqt_jax.models.config import from_config
from oqt_jax.quant import points
from oqt_jax.train import guards, losses, testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny_opt_vanilla.py')
FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MODEL_RUNS = settings(max_examples=6, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])

# Values a user can type: ints (negative, huge), floats (NaN, inf), strings, bools, None,
# containers.
values = st.one_of(
    st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.booleans(), st.none(),
    st.lists(st.integers(-3, 3), max_size=3), st.sampled_from(['', ' ', '-1', '0', '1e9']))


def _fields():
  c = base.get_config().to_dict()
  out = []
  for k, v in c.items():
    if isinstance(v, dict):
      out += [(k, f) for f in v]
    else:
      out.append((None, k))
  return out


FIELDS = _fields()


def _one_line_naming(e, *names):
  msg = str(e)
  assert '\n' not in msg and msg.strip() == msg and msg, msg
  head = msg.split(':')[0]
  assert any(n in head for n in names), (names, msg)


@FAST
@given(field=st.sampled_from(FIELDS), value=values)
def test_any_config_value_validates_or_names_its_field(field, value):
  section, name = field
  c = base.get_config().to_dict()
  (c[section] if section else c)[name] = value
  path = f'{section}.{name}' if section else name
  try:
    validate(ml_collections.ConfigDict(c))
  except ConfigError as e:
    # The field itself, or (cross-field checks) another field of the same section.
    _one_line_naming(e, path, section or name, 'mesh' if section == 'mesh' else path)


@FAST
@given(spec=st.one_of(
    st.text(max_size=20),
    st.builds(lambda g, z, sp: f'clipped({g}{sp}:{sp}{z})',
              st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                        st.text(max_size=4)),
              st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)),
              st.sampled_from(['', ' '])),
    st.sampled_from(['vanilla', 'clipped(-.025:1)', 'clipped(0:1)', 'clipped(-0:1.0)'])),
    gate=st.one_of(st.text(max_size=24), st.sampled_from(
        ['none', 'unconditional_per_head', 'conditional_per_head', 'conditional_per_token'])))
def test_softmax_and_gate_strings(spec, gate):
  m = base.model_defaults().to_dict()
  m.update(softmax=spec, gate=gate)
  try:
    cfg = from_config(m)
  except ConfigError as e:
    _one_line_naming(e, 'model.softmax', 'model.gate')
    return
  gamma, zeta = cfg.clip_gamma_zeta
  assert math.isfinite(gamma) and math.isfinite(zeta) and gamma <= 0 <= 1 <= zeta


keys = st.one_of(
    st.sampled_from(sorted(set(points.ALL_LAYER_ACTS) | set(points.ALL_GLOBAL_ACTS)
                           | set(points.ALL_TABLES) | {'L', 'wq', 'wf', 'wM', 'wC'})),
    st.text(max_size=6))
layer_keys = st.builds(lambda k, i: f'{k}{i}' if i is not None else k, keys,
                       st.one_of(st.none(), st.integers(0, 30)))
qvalues = st.one_of(st.integers(-3, 40), st.booleans(), st.none(), st.floats(),
                    st.sampled_from(['fp32', 'per_tensor', 'per_embd', 'ng4', 'ngp8', 'ng0',
                                     'ngp', '8', 'x']), st.text(max_size=6))
quant_dicts = st.one_of(st.dictionaries(layer_keys, qvalues, max_size=4), st.text(max_size=30),
                        st.dictionaries(layer_keys, qvalues, max_size=3).map(repr))


@FAST
@given(qd=quant_dicts, model_type=st.sampled_from(['bert', 'opt']),
       num_layers=st.integers(1, 12))
def test_quant_dict_strings_and_dicts(qd, model_type, num_layers):
  q = dict(base.quant_defaults().to_dict(), quant_dict=qd)
  try:
    checks.check_quant_points(q, model_type, num_layers)
    points.validate_quant_config(q)
  except ConfigError as e:
    _one_line_naming(e, 'quant.quant_dict')
    if 'unknown point' in str(e) and '(known: ' in str(e):   # only this model's points listed
      known = str(e).split('(known: ')[1].split(',')
      other = 'opt' if model_type == 'bert' else 'bert'
      only_other = set(points.LAYER_ACTS[other]) - set(points.LAYER_ACTS[model_type])
      assert not only_other & {k.strip() for k in known}, str(e)


@FAST
@given(over=st.dictionaries(
    st.one_of(st.sampled_from(['num_train_steps', 'learning_rate', 'model.softmax', 'model.gate',
                               'quant.quant_dict', 'nonfinite', 'mesh.data', 'data.block_size',
                               'model.num_heads', 'max_skipped_steps']),
              st.text(alphabet='abcdefghijklmnopqrstuvwxyz_.', min_size=1, max_size=16)),
    st.one_of(st.text(alphabet=st.characters(blacklist_categories=('Cs', 'Cc')), max_size=10),
              st.integers(-5, 10**6).map(str), st.floats().map(str)),
    max_size=3))
def test_command_line_overrides(over, capsys):
  """--config.<field>=<text> then validation: a config, or SystemExit(2) / ConfigError with
  one line; never another exception."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'c', flag_values=fv, lock_config=False)
  argv = ['prog', f'--config={TINY}'] + [f'--config.{k}={v}' for k, v in over.items()]
  try:
    with mock.patch.object(sys, 'argv', argv):   # ml_collections reads overrides from sys.argv
      parse_cli_flags(argv, fv)
  except SystemExit as e:
    assert e.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    return
  try:
    validate(fv.config)
  except ConfigError as e:
    assert '\n' not in str(e)


# ----------------------------------------------------------------------------- batches
V, P, T = 64, 16, 12


@pytest.fixture(scope='module')
def tiny():
  return testing.tiny_opt(V, P)


@FAST
@given(ids=st.lists(st.lists(st.integers(-2 * V, 2 * V), min_size=1, max_size=2 * P),
                    min_size=1, max_size=3).filter(lambda r: len({len(x) for x in r}) == 1))
def test_token_ids_and_lengths_are_checked(ids):
  batch = {'input_ids': np.asarray(ids, np.int64)}
  a = batch['input_ids']
  ok = a.min() >= 0 and a.max() < V and a.shape[1] <= P
  try:
    guards.check_batch(batch, V, P, where='validation batch 0')
    assert ok
  except DataError as e:
    assert not ok
    _one_line_naming(e, 'validation batch 0')
    assert ('model.vocab_size=64' in str(e)) or ('model.max_position_embeddings=16' in str(e))


@MODEL_RUNS
@given(ids=st.lists(st.integers(0, V - 1), min_size=2 * T, max_size=2 * T),
       lengths=st.lists(st.integers(0, T), min_size=2, max_size=2))
def test_checked_batches_give_finite_results_all_padding_is_an_error(tiny, ids, lengths):
  """Any in-range ids with any padding (all-padding rows and batches included) run through
  one compiled eval step; a batch without a single valid token is a DataError, not NaN."""
  model, variables = tiny
  ids = np.asarray(ids, np.int32).reshape(2, T)
  mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  batch = {'input_ids': ids, 'attention_mask': mask, 'labels': np.where(mask > 0, ids, -100)}
  got = list(checks.checked([batch], model, 'validation batch'))
  m = outliers.evaluate(model, variables, got, num_batches=1)
  s, c = jax.jit(lambda b: losses.clm_loss(jnp.zeros((2, T, V)), b['labels'],
                                           b['attention_mask']))(batch)
  assert np.isfinite(float(s)) and float(c) == max(0, lengths[0] - 1) + max(0, lengths[1] - 1)
  if m['num_tokens'] == 0:
    with pytest.raises(DataError, match='^validation split: the evaluation batches have no '
                                        'valid'):
      checks.check_finite_metrics(m, 'model')
  else:
    checks.check_finite_metrics(m, 'model')
    assert math.isfinite(m['loss']) and math.isfinite(m['max_inf_norm'])


def test_empty_eval_set_and_bad_batch_counts(tmp_path, tiny, monkeypatch):
  c = base.get_config()
  for kw, needle in (({'num_batches': 0}, '--num_batches=0'),
                     ({'batch_size': -3}, '--batch_size=-3')):
    with pytest.raises(ConfigError, match=needle):
      run.evaluate_run(c, str(tmp_path), **kw)

  class Empty:   # a validation split with no rows
    def num_eval_batches(self, batch_size):
      return 0

    def eval_batches(self, batch_size, num_batches=None):
      return iter(())
  monkeypatch.setattr(run, 'load_model', lambda *a, **k: (*tiny, 'tiny'))
  monkeypatch.setattr(run, 'datasets', lambda *a, **k: (Empty(), None))
  with pytest.raises(DataError, match='^validation split: no evaluation batch'):
    run.evaluate_run(c, str(tmp_path), plots_on=False, progress=False)


def test_hf_model_dir_without_config_json(tmp_path):
  c = base.get_config()
  with pytest.raises(CheckpointError, match=f'^--hf_model={tmp_path}: no config.json in '
                                            f'{tmp_path}$'):
    run.evaluate_run(c, str(tmp_path / 'out'), hf_model=str(tmp_path))
  with pytest.raises(CheckpointError, match='no such directory'):
    run.evaluate_run(c, str(tmp_path / 'out'), hf_model=str(tmp_path / 'missing'))


def test_quant_settings_that_fail_on_the_model_are_checked_first(tiny):
  """Before any batch is evaluated: PEG groups must divide each grouped point's width, points
  must exist for this model type (the message lists only its points) and layer indices must
  exist."""
  model, variables = tiny
  c = base.get_config()
  c.quant.quant_dict = "{'h': 'ng5'}"         # h is 16 wide
  with pytest.raises(ConfigError, match="^quant.quant_dict: point 'h0' has 16 dims, not "
                                        "divisible into 5 groups"):
    checks.check_quant_for_model(c, model, variables)
  c.quant.quant_dict = "{'f': 'ngp8', 'h': 'ng4', 'wq0': 4}"
  checks.check_quant_for_model(c, model, variables)
  c.quant.quant_dict = "{'z': 8}"            # a BERT point
  with pytest.raises(ConfigError) as e:
    checks.check_quant_for_model(c, model, variables)
  known = str(e.value).split('(known: ')[1].split(', per-layer')[0].split(', ')
  assert str(e.value).startswith("quant.quant_dict: unknown point 'z' for opt")
  assert sorted(known) == sorted(set().union(*checks.model_points('opt')))
  assert 'z' not in known and 'Mln' not in known and 'a' in known and 'fln' in known
  c.quant.quant_dict = "{'h3': 8}"
  with pytest.raises(ConfigError, match="point 'h3': the opt model has 1 layers"):
    checks.check_quant_for_model(c, model, variables)


# ---------------------------------------------------------------- methods and GLUE fields
def _method_names():
  from oqt_jax.quant import methods
  return sorted(n for n in methods.names() if n)


def _misspelt(name):
  return st.builds(lambda i, c: name[:i] + c + name[i + 1:],
                   st.integers(0, max(len(name) - 1, 0)), st.sampled_from('xq_ -'))


@FAST
@given(method=st.one_of(st.sampled_from([''] + _method_names()), st.text(max_size=16),
                        st.sampled_from(_method_names()).flatmap(_misspelt)),
       n_bits=st.one_of(st.integers(-3, 40), st.sampled_from([2, 4, 6, 8, 16])),
       n_bits_act=st.one_of(st.integers(-3, 40), st.sampled_from([4, 6, 8, 16, 32])),
       extra=st.sampled_from([{}, {'int8': True}, {'weight_only': True}, {'adaround': True},
                              {'adaround_iters': 0}, {'qat': True}]))
def test_quant_method_and_bits_validate_or_name_the_field(method, n_bits, n_bits_act, extra):
  """Any method name and bit widths: valid, or one line naming quant.method (an unknown
  name lists every known one) or the bit-width field."""
  from oqt_jax.quant import methods, validate_quant_config
  c = base.get_config()
  c.quant.update(dict(method=method, n_bits=n_bits, n_bits_act=n_bits_act, **extra))
  try:
    validate_quant_config(c)
    q = methods.with_preset(c.quant, method, ['n_bits', 'n_bits_act', *extra], batch_size=8)
    validate_quant_config(q)
  except ConfigError as e:
    _one_line_naming(e, 'quant.')
    if str(e).startswith('quant.method='):
      for known in _method_names():
        assert known in str(e), (known, str(e))
    return
  assert method == '' or method in methods.names()
  assert 2 <= n_bits <= 16 and (2 <= n_bits_act <= 16 or n_bits_act == 32)


GLUE_LABELS = st.one_of(st.integers(-3, 5), st.text(max_size=6),
                        st.sampled_from(['0', '1', '2', '1.0', 'entailment', 'not_entailment',
                                         'nan', '']))


@FAST
@given(task=st.sampled_from(['sst2', 'rte', 'mnli', 'stsb', 'cola']),
       labels=st.lists(GLUE_LABELS, min_size=1, max_size=6))
def test_glue_rows_load_or_name_file_and_row(tmp_path_factory, task, labels):
  """A GLUE TSV with any label column: every label inside the task's label set (a finite
  number for STS-B), or one line naming the file and its line."""
  from oqt_jax.data import glue
  d = tmp_path_factory.mktemp('glue')
  info = glue.glue_task_info(task)
  fmt = glue.TSV_FORMATS[task]
  labels = [str(l).replace('\t', ' ').replace('\n', ' ').replace('\r', ' ') for l in labels]
  if fmt.header:
    names = [c for c in fmt.columns if c is not None]
    lines = ['\t'.join(names)]
    for i, l in enumerate(labels):
      row = {fmt.columns[0]: f'first {i}', fmt.columns[2]: l}
      if fmt.columns[1]:
        row[fmt.columns[1]] = f'second {i}'
      lines.append('\t'.join(row[n] for n in names))
  else:   # CoLA: source, label, original label, sentence
    lines = [f'src\t{l}\t*\tsentence {i}' for i, l in enumerate(labels)]
  path = d / 'train.tsv'
  path.write_text('\n'.join(lines) + '\n')
  try:
    cols = glue.read_glue_tsv(str(path), task)
  except DataError as e:
    msg = str(e)
    assert '\n' not in msg and str(path) in msg and ' line ' in msg, msg
    return
  for v in cols['label']:
    if info.is_regression:
      assert math.isfinite(v)
    else:
      assert isinstance(v, int) and 0 <= v < info.num_labels


@FAST
@given(task=st.one_of(st.text(max_size=8), st.sampled_from(['sst2', 'mnli', 'rte'])),
       have=st.sets(st.sampled_from(['train.tsv', 'dev.tsv', 'dev_matched.tsv',
                                     'dev_mismatched.tsv', 'validation.jsonl']), max_size=3))
def test_glue_folder_fields(tmp_path_factory, task, have):
  """data.glue_task / data.files: validation passes only when the task is known and its dev
  split(s) are in the folder; otherwise one line naming the field or the missing file."""
  from oqt_jax.data import glue
  d = tmp_path_factory.mktemp('glue_dir')
  for f in have:
    (d / f).write_text('')
  c = base.get_config()
  c.data.update(dict(source='glue', glue_task=task, files=str(d)))
  try:
    validate(c)
  except (ConfigError, DataError) as e:
    _one_line_naming(e, 'data.glue_task', 'data.files')
    return
  info = glue.glue_task_info(task)
  need = {'mnli': [('dev_matched.tsv', 'validation_matched.jsonl')]}.get(
      info.name, [('dev.tsv', 'validation.jsonl')])
  for tsv, jsonl in need:
    assert tsv in have or jsonl in have
