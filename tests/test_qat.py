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


def _tiny_model():
  cfg = models.from_config(dict(model_type='opt', vocab_size=64, hidden_size=32, num_layers=1,
                                num_heads=2, intermediate_size=64, max_position_embeddings=32,
                                pad_token_id=1))
  model = models.build(cfg)
  return model, models.init_variables(model, jax.random.PRNGKey(0))


@pytest.mark.parametrize('learn', ['lsq', 'lsq+'])
def test_lsq_state_starts_at_the_calibrated_quantizer_and_gets_gradients(learn):
  model, variables = _tiny_model()
  ids = np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32)
  batches = [{'input_ids': ids, 'attention_mask': np.ones_like(ids)}]
  qcfg = quant.config(n_bits=4, est_num_batches=1, qat=True, learn_ranges=learn)
  qmodel, qvars = quant.calibrate(model, variables, batches, qcfg)
  ref = qmodel.apply(qvars, ids).logits
  state = qat.to_learned(qvars['quant'], qmodel.quant.rules, learn)
  cfg = _cfg({})
  with cfg.unlocked():
    cfg.quant = qcfg
  lmodel = qat.quantized_model(model, cfg)
  out = lmodel.apply(dict(variables, quant=state), ids).logits
  # The same quantizers (float32 reassociation may move a few values across a rounding
  # boundary of the 8-bit logits, one grid step).
  diff = np.abs(np.asarray(out) - np.asarray(ref))
  assert np.mean(diff < 1e-5) > 0.9 and diff.max() < 0.02, (np.mean(diff < 1e-5), diff.max())

  learned = qat.split(state, learn)
  def loss(r):
    return jax.numpy.mean(lmodel.apply(dict(variables, quant=qat.merge(state, r)), ids).logits
                          ** 2)
  g = jax.grad(loss)(learned)
  flat = {k: np.asarray(v) for k, v in qat.range_values(g).items()}
  scales = [k for k in flat if k.endswith('scale')]
  assert scales and all(np.any(flat[k] != 0) for k in scales if '/wq0/' in k or '/wf0/' in k)
  zps = [k for k in flat if k.endswith('zero_point')]
  assert bool(zps) == (learn == 'lsq+')


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
