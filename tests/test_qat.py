"""QAT (quant/methods/qat.py + the training loop): W4A8 QAT of a trained tiny OPT beats W4A8
PTQ of the same model, the ranges move, eval.py evaluates the exported quantizers without
recalibrating, the LSQ parameterisation starts at the calibrated quantizer, and kill -9 + rerun
reproduces the per-step losses of an uninterrupted QAT run."""
import os
import shutil
import signal

import jax
import numpy as np
import pytest
import torch

from oqt_jax import data, models, quant
from oqt_jax.config import load_config_file
from oqt_jax.evaluate.run import evaluate_run
from oqt_jax.models import hf
from oqt_jax.quant.methods import qat
from oqt_jax.train import metrics, testing
from oqt_jax.train.loop import resolve_config, train_and_evaluate

CONFIG = 'configs/tiny_opt_vanilla.py'
FP_STEPS, QAT_STEPS = 150, 250
BASE = dict(testing.TINY_OVERRIDES, log_every_steps=1, eval_every_steps=0, num_eval_batches=2,
            **{'quant.n_bits': 4, 'quant.est_num_batches': 2})
FP = dict(BASE, num_train_steps=FP_STEPS, checkpoint_every_steps=FP_STEPS)
QAT = dict(BASE, num_train_steps=QAT_STEPS, checkpoint_every_steps=20, learning_rate=1e-3,
           warmup_steps=0, **{'quant.qat': True, 'quant.learn_ranges': 'minmax'})


def _cfg(overrides):
  return load_config_file(os.path.join(testing.REPO_ROOT, CONFIG), overrides)


def _losses(workdir):
  return {s: r['loss'] for s, r in metrics.read_metrics(str(workdir)).items()}


@pytest.fixture(scope='module')
def fp_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('fp') / 'run')
  train_and_evaluate(_cfg(FP), workdir, progress=False)
  return workdir


@pytest.fixture(scope='module')
def qat_run(tmp_path_factory, fp_run):
  workdir = str(tmp_path_factory.mktemp('qat') / 'run')
  shutil.copytree(fp_run, workdir)
  summary = train_and_evaluate(_cfg(QAT), workdir, progress=False)
  return workdir, summary


def test_qat_beats_ptq_and_ranges_move(fp_run, qat_run, capsys):
  workdir, summary = qat_run
  assert summary['step'] == QAT_STEPS
  ptq = evaluate_run(_cfg(BASE), fp_run, quantize=True, plots_on=False, progress=False,
                     out_dir=os.path.join(fp_run, 'ptq'))
  qat_loss = summary['eval']['eval_loss']           # the quantized model's eval loss
  assert qat_loss < ptq['quantized']['loss'] - 0.01, (qat_loss, ptq['quantized']['loss'])

  # eval.py on the QAT workdir: the exported quantizers, no calibration, the same loss; quant
  # fields named on the command line that disagree with them are reported as ignored.
  capsys.readouterr()
  ev = evaluate_run(_cfg(dict(BASE, **{'quant.n_bits': 8})), workdir, quantize=True,
                    plots_on=False, progress=False, explicit_quant=('n_bits', 'est_num_batches'))
  assert ev['quantized']['loss'] == pytest.approx(qat_loss, rel=1e-6)
  assert ev['quantized']['quant_config']['n_bits'] == 4
  err = capsys.readouterr().err
  assert 'calibrating' not in err and 'learned by QAT' in err and 'W4A8' in err, err
  assert 'quant.n_bits=8 on the command line ignored' in err and 'est_num' not in err, err

  # The ranges moved away from their calibrated values.
  cfg = _cfg(FP)
  tok = data.get_tokenizer(cfg, fp_run)
  cfg = resolve_config(cfg, tok)
  ds = data.build_dataset(cfg, tok, 'train', workdir=fp_run)
  model, variables = hf.load(os.path.join(fp_run, 'hf'))
  start = qat.calibrate_ranges(model, variables['params'], [ds.batch(i, 8) for i in range(2)],
                               _cfg(QAT))
  learned = qat.load_exported(os.path.join(workdir, 'hf'))[1]
  a, b = qat.range_values(start), qat.range_values(learned)
  assert set(a) == set(b) and len(a) > 20
  moved = [k for k in a if np.max(np.abs(a[k] - np.asarray(b[k]))) > 1e-4]
  assert len(moved) > len(a) // 2, moved


@pytest.fixture(scope='module')
def tiny():
  """A tiny OPT calibrated (W4A8) on one batch: (model, variables, ids, qcfg, qmodel, qvars)."""
  cfg = models.from_config(dict(model_type='opt', vocab_size=64, hidden_size=32, num_layers=1,
                                num_heads=2, intermediate_size=64, max_position_embeddings=32,
                                pad_token_id=1))
  model = models.build(cfg)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  ids = np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32)
  qcfg = quant.config(n_bits=4, est_num_batches=1, qat=True)
  qmodel, qvars = quant.calibrate(
      model, variables, [{'input_ids': ids, 'attention_mask': np.ones_like(ids)}], qcfg)
  return model, variables, ids, qcfg, qmodel, qvars


def _learn_cfg(qcfg, learn):
  cfg = _cfg({})
  with cfg.unlocked():
    cfg.quant = qcfg.copy_and_resolve_references()
    cfg.quant.learn_ranges = learn
  return cfg


def _points(state):
  """{point path: its state dict} of the range states in a 'quant' collection."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  out = {}
  for path, _ in flat:
    keys = tuple(k.key for k in path)
    if qat._is_point_state(keys):
      out.setdefault(keys[:-1], set()).add(keys[-1])
  return out


@pytest.mark.parametrize('learn', ['minmax', 'lsq', 'lsq+'])
def test_learned_state_starts_at_the_calibrated_quantizer_and_gets_gradients(tiny, learn):
  model, variables, ids, qcfg, qmodel, qvars = tiny
  ref = qmodel.apply(qvars, ids).logits
  state = qat.to_learned(qvars['quant'], qmodel.quant.rules, learn)
  lmodel = qat.quantized_model(model, _learn_cfg(qcfg, learn))
  out = lmodel.apply(dict(variables, quant=state), ids).logits
  # The same quantizers (float32 reassociation may move a few values across a rounding
  # boundary of the 8-bit logits, one grid step).
  diff = np.abs(np.asarray(out) - np.asarray(ref))
  assert np.mean(diff < 1e-5) > 0.9 and diff.max() < 0.02, (np.mean(diff < 1e-5), diff.max())

  learned = qat.split(state, learn)
  # The learned leaves: minmax (delta, zero_float) for the asymmetric activation quantizers,
  # delta alone for the symmetric weight quantizers; never x_min / x_max.
  points = _points(learned)
  weights = {p for p in points if str(p[-1]).startswith('w') or p[-1] in ('Et', 'Ep')}
  acts = set(points) - weights
  assert weights and acts
  if learn == 'minmax':
    assert all(points[p] == {'delta'} for p in weights), points
    assert all(points[p] == {'delta', 'zero_float'} for p in acts), points
    assert not any({'x_min', 'x_max'} & k for k in _points(state).values())
  else:
    want_acts = {'scale', 'zero_point'} if learn == 'lsq+' else {'scale'}
    assert all(points[p] == {'scale'} for p in weights), points     # symmetric: no zero-point
    assert all(points[p] == want_acts for p in acts), points

  def loss(r):
    return jax.numpy.mean(lmodel.apply(dict(variables, quant=qat.merge(state, r)), ids).logits
                          ** 2)
  g = jax.grad(loss)(learned)
  flat = {k: np.asarray(v) for k, v in qat.range_values(g).items()}
  steps = [k for k in flat if k.endswith(('scale', 'delta'))]
  assert steps and all(np.any(flat[k] != 0) for k in steps if '/wq0/' in k or '/wf0/' in k)


# The original's uniform quantizers (AsymmetricUniformQuantizer / SymmetricUniformQuantizer
# in transformer-quantization's quantization/quantizers.py), restated in torch from its
# formulas: round with a straight-through gradient, scale = clamp(delta, min=eps),
# zero point = clamp(round_ste(zero_float), int_min, int_max).
def _t_round_ste(v):
  return (torch.round(v) - v).detach() + v


def torch_uniform(x, delta, zero_float, int_min, int_max, eps=1e-8):
  scale = torch.clamp(delta, min=eps)
  zp = 0.0 if zero_float is None else torch.clamp(_t_round_ste(zero_float), int_min, int_max)
  x_int = torch.clamp(_t_round_ste(x / scale) + zp, int_min, int_max)
  return scale * (x_int - zp)


def torch_set_quant_range(x_min, x_max, n_bits, symmetric, eps=1e-8):
  x_min, x_max = torch.clamp(x_min, max=0.0), torch.clamp(x_max, min=eps)
  if symmetric:
    signed = bool(x_min.min() < 0)
    int_max = 2.0 ** (n_bits - signed) - 1
    return x_max.abs().max(x_min.abs()) / int_max, None
  delta = (x_max - x_min) / (2.0 ** n_bits - 1)
  return delta, -x_min / delta


MINMAX_CASES = {   # n_bits, symmetric, per channel, zero_float (None: from the range)
    'asym8': (8, False, False, None), 'asym4': (4, False, False, None),
    'asym4_zf_past_grid': (4, False, False, 17.3), 'asym4_per_channel': (4, False, True, None),
    'sym4_signed': (4, True, False, None), 'sym8_per_channel': (8, True, True, None),
    'sym4_unsigned': (4, True, False, 'unsigned')}


@pytest.mark.parametrize('case', list(MINMAX_CASES))
def test_minmax_forward_and_gradients_equal_torch_autograd_of_the_original(case):
  """qat.minmax_quantize (value, d/dx, d/d delta, d/d zero_float) and qat.minmax_init against
  the torch restatement: inside and outside the grid, per tensor and per channel."""
  n_bits, symmetric, per_channel, zf = MINMAX_CASES[case]
  rng = np.random.default_rng(len(case))
  x = rng.normal(0.4, 1.0, (64, 8)).astype(np.float32)
  x[::9, 1] *= 6.0                                      # outliers beyond the range: clamped
  if zf == 'unsigned':
    x = np.abs(x)
  red = (0,) if per_channel else None
  x_min = 0.6 * x.min(axis=red)
  x_max = 0.6 * x.max(axis=red)                         # a range narrower than the data
  init = qat.minmax_init(x_min, x_max, n_bits, symmetric)
  t_delta, t_zf = torch_set_quant_range(torch.tensor(x_min), torch.tensor(x_max), n_bits,
                                        symmetric)
  np.testing.assert_allclose(np.asarray(init['delta']), t_delta.numpy(), rtol=1e-6)
  if symmetric:
    assert 'zero_float' not in init
    zf_val = None
  else:
    np.testing.assert_allclose(np.asarray(init['zero_float']), t_zf.numpy(), rtol=1e-6)
    zf_val = np.asarray(init['zero_float']) if zf is None else np.full_like(x_min, zf)
  delta = np.asarray(init['delta'], np.float32)
  q_min, q_max = float(init['q_min']), float(init['q_max'])
  signed = symmetric and zf != 'unsigned'
  assert (q_min, q_max) == ((-2.0 ** (n_bits - 1), 2.0 ** (n_bits - 1) - 1) if signed
                            else (0.0, 2.0 ** n_bits - 1))
  w = rng.normal(0, 1, x.shape).astype(np.float32)

  args = (delta,) if zf_val is None else (delta, zf_val.astype(np.float32))
  def f_jax(x, *p):
    return qat.minmax_quantize(x, p[0], p[1] if len(p) > 1 else None, q_min, q_max)
  out = np.asarray(f_jax(x, *args))
  grads = jax.grad(lambda x, *p: jax.numpy.sum(f_jax(x, *p) * w),
                   argnums=tuple(range(1 + len(args))))(x, *args)
  tx = torch.tensor(x, requires_grad=True)
  tp = [torch.tensor(a, requires_grad=True) for a in args]
  t_out = torch_uniform(tx, tp[0], tp[1] if len(tp) > 1 else None, q_min, q_max)
  (t_out * torch.tensor(w)).sum().backward()
  t_grads = [tx.grad.numpy()] + [p.grad.numpy() for p in tp]

  np.testing.assert_array_equal(out, t_out.detach().numpy())
  v = x / delta + (0 if zf_val is None else np.clip(np.round(zf_val), q_min, q_max))
  assert (v < q_min - 0.5).any() or (v > q_max + 0.5).any()      # both branches exercised
  assert ((v > q_min) & (v < q_max)).any()
  for a, b in zip(grads, t_grads):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6 * max(1.0, np.abs(b).max()))
  if zf_val is not None:
    g_zf = np.asarray(grads[2])
    assert (np.all(g_zf == 0) if zf == 17.3 else np.any(g_zf != 0))   # clamped zp: no grad


def test_none_reestimates_the_ranges_at_every_training_step(tiny):
  """learn_ranges='none' (the original's default, estimate_ranges_train): one forward in mode
  'learned' runs every estimator on that batch. Activations: the state equals calibration
  continued on the batch (running_minmax EMA); weights: re-estimated from the current
  weights; nothing of the state is learnable."""
  model, variables, ids, qcfg, qmodel, qvars = tiny
  assert quant.config().learn_ranges == 'none' == _cfg({}).quant.learn_ranges
  ids2 = (ids * 7 + 3) % 64
  batches = [{'input_ids': b, 'attention_mask': np.ones_like(b)} for b in (ids, ids2)]
  _, want = quant.calibrate(model, variables, batches, qcfg, num_batches=2)
  lmodel = qat.quantized_model(model, _learn_cfg(qcfg, 'none'))
  assert qat.split(qvars['quant'], 'none') == {}
  _, upd = lmodel.apply(dict(variables, quant=qvars['quant']), ids2, np.ones_like(ids2),
                        mutable=['quant'])
  got, start, ref = (qat.range_values(t) for t in (upd['quant'], qvars['quant'],
                                                    want['quant']))
  acts = [p for p in got if not p.split('/')[-2].startswith('w') and '/M/' not in f'/{p}']
  moved = [p for p in acts if np.max(np.abs(got[p] - start[p])) > 1e-6]
  assert len(moved) > len(acts) // 2, moved
  for p in acts:
    np.testing.assert_allclose(got[p], ref[p], rtol=1e-5, atol=1e-6, err_msg=p)
  # A weight changed by the optimizer step: its range follows (current_minmax of 3 W).
  params = jax.tree.map(lambda a: a, variables['params'])
  k = params['decoder_layer_0']['attention']['query']['kernel']
  params['decoder_layer_0']['attention']['query']['kernel'] = 3.0 * k
  _, upd = lmodel.apply({'params': params, 'quant': qvars['quant']}, ids2, mutable=['quant'])
  wq = 'decoder_layer_0/attention/query/wq0/x_max'
  np.testing.assert_allclose(qat.range_values(upd['quant'])[wq], 3.0 * start[wq], rtol=1e-6)


@pytest.fixture(scope='module')
def hf_bert_and_rte(tmp_path_factory):
  """A tiny BertForMaskedLM written by transformers' save_pretrained (random weights, a
  tokenizer trained on the task's words) and an RTE-format folder (train.tsv, dev.tsv)."""
  import transformers
  from oqt_jax.data.tokenizer import train_tokenizer
  root = tmp_path_factory.mktemp('hf_qat')
  subj = ['the cat', 'the dog', 'a bird', 'he', 'she', 'they']
  rte = root / 'rte'
  rte.mkdir()
  for name, n in (('train.tsv', 32), ('dev.tsv', 8)):
    rows = [f'{i}\t{subj[i % 6]} sat on the mat\t{subj[i % 6]} {"sat" if i % 2 else "ran"}\t'
            f'{"entailment" if i % 2 else "not_entailment"}' for i in range(n)]
    (rte / name).write_text('index\tsentence1\tsentence2\tlabel\n' + '\n'.join(rows) + '\n')
  tok = train_tokenizer([' '.join(subj) + ' sat on the mat ran'] * 20, 'bert_bpe', 96, 64)
  torch.manual_seed(0)
  hf_dir = root / 'bert'
  transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(hf_dir))
  tok.save_pretrained(str(hf_dir))
  return hf_dir, rte


def test_qat_of_an_hf_checkpoint_on_a_glue_task(tmp_path, hf_bert_and_rte):
  """train.py --config configs/glue/rte.py --config.init_from=HF_DIR --config.data.files=DIR
  --config.quant.qat=True --config.quant.n_bits=4 (learn_ranges left at 'none', with gradient
  accumulation): trains, re-estimates the ranges, checkpoints and exports the quantizers."""
  hf_dir, rte = hf_bert_and_rte
  cfg = load_config_file(os.path.join(testing.REPO_ROOT, 'configs', 'glue', 'rte.py'), {
      'init_from': str(hf_dir), 'data.files': str(rte), 'data.max_seq_length': 32,
      'num_train_epochs': -1.0, 'num_train_steps': 2, 'per_device_batch_size': 4,
      'gradient_accumulation_steps': 2, 'num_eval_batches': 0, 'eval_every_steps': 0,
      'quant.qat': True, 'quant.n_bits': 4, 'quant.est_num_batches': 1})
  workdir = tmp_path / 'run'
  summary = train_and_evaluate(cfg, str(workdir), progress=False)
  assert summary['step'] == 2 and np.isfinite(summary['train']['loss'])
  assert testing.committed_steps(str(workdir)) == [2]
  got = qat.load_exported(str(workdir / 'hf'))
  assert got is not None and got[0].learn_ranges == 'none' and got[0].n_bits == 4
  model, _ = hf.load(str(workdir / 'hf'))
  assert model.cfg.resolved_head == 'cls' and model.cfg.hidden_size == 32
  # Every estimator ran once at calibration (weights: once at init) and then on each of the
  # 2 x 2 training micro-batches: the exported ranges are the re-estimated ones.
  counts = {'/'.join(str(k.key) for k in p[:-1]): int(v) for p, v in
            jax.tree_util.tree_flatten_with_path(got[1])[0]
            if p[-1].key == 'n' and qat._is_point_state(tuple(k.key for k in p))}
  assert len(counts) > 20 and set(counts.values()) == {5}, counts


def test_quant_dict_accepts_a_python_dict():
  q = quant.config(quant_dict={'h': 'ngp6', 'y': 16})
  assert quant.rules(q, models.from_config(dict(model_type='bert', num_layers=1))).spec(
      'y0').n_bits == 16
  cfg = _cfg({})
  cfg.quant.quant_dict = {'x': 'fp32'}
  quant.validate_quant_config(cfg)
  cfg.quant.quant_dict = "{'x': 16}"
  quant.validate_quant_config(cfg)
  with pytest.raises(quant.points.ConfigError, match='quant.adaround_iters'):
    quant.config(adaround_iters=-1)
  with pytest.raises(quant.points.ConfigError, match='quant.learn_ranges'):
    quant.config(learn_ranges='bogus')


# ----------------------------------------------------------------------------- kill -9
@pytest.mark.slow
def test_kill_9_then_rerun_resumes_qat_with_the_same_losses(tmp_path, fp_run, qat_run):
  ref_dir, _ = qat_run
  want = _losses(ref_dir)
  workdir = str(tmp_path / 'run')
  shutil.copytree(fp_run, workdir)
  env = testing.subprocess_env()
  rc, err = testing.signal_train_when(
      CONFIG, workdir, QAT, lambda: any(s > FP_STEPS for s in testing.committed_steps(workdir)),
      env=env, timeout=400)
  assert rc == -signal.SIGKILL, err[-2000:]
  assert 'QAT starts from the floating-point checkpoint' in err
  ckpt = max(testing.committed_steps(workdir))
  assert FP_STEPS < ckpt < QAT_STEPS
  r = testing.run_train(CONFIG, workdir, QAT, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'(step {ckpt})' in r.stderr and 'QAT: ranges calibrated' not in r.stderr
  got = _losses(workdir)
  for s in range(FP_STEPS + 1, QAT_STEPS + 1):
    assert abs(got[s] - want[s]) <= 1e-5 * max(1.0, abs(want[s])), (s, got[s], want[s])
