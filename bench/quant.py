"""Quantized evaluation and calibration speed of oqt_jax, measured in one run.

  python bench/quant.py                  # BERT and OPT at the CPU shape
  python bench/quant.py --models opt --reps 7

Per model (4 layers, hidden 256, 4 heads, FFN 1024, seq 128, eval batch 16, fp32, random
init): the jitted eval step (forward + LM loss) in floating point, W8A8 fake-quant
(calibrated, frozen ranges, quant_setup='all': every point including OPT's LM head) and
int8 matmuls through AQT (quant.int8), timed interleaved on the same batch, median of
--reps; calibration with the OPT recipe (MSE weight ranges, est_num_batches 4), timed once
cold (compilation included) and again warm (the jitted calibration steps are cached), so
compilation is reported separately. Targets: W8A8 eval <= 1.1x FP; warm calibration <= 4 s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
import shapes  # noqa: E402
from jax_worker import model_config  # noqa: E402
from oqt_jax import models, quant  # noqa: E402
from oqt_jax.train import losses  # noqa: E402


def eval_fn(model, head):
  """The loss of eval.py's evaluation step (OPT: LM head and loss chunk by chunk)."""
  def f(variables, batch):
    inputs = quant.model_inputs(model, batch)
    if head == 'clm':
      out = model.apply(variables, **inputs, loss_labels=batch['labels'])
      return out.lm_loss
    out = model.apply(variables, **inputs)
    return losses.loss_for_head(head, out.logits, batch)
  return jax.jit(f)


def run_model(mt, args, shape):
  cfg = model_config(mt, 'vanilla', **shape)
  model = models.build(cfg)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  cal = [shapes.make_batch(mt, shape['batch'], shape['seq_len'], seed=s) for s in range(4)]
  cal = [{k: jnp.asarray(v, jnp.int32) for k, v in b.items()
          if mt == 'bert' or k != 'token_type_ids'} for b in cal]
  batch = cal[0]
  head = cfg.resolved_head
  res = {'model': mt}

  # Calibration, OPT recipe: MSE weight ranges, running min-max activations, 4 batches.
  def calibrate(**kw):
    qcfg = quant.config(n_bits=8, n_bits_act=8, quant_setup='all', est_num_batches=4, **kw)
    t0 = time.perf_counter()
    qmodel, qvars = quant.calibrate(model, variables, cal, qcfg)
    jax.block_until_ready(qvars)
    return qmodel, qvars, time.perf_counter() - t0

  qmodel, qvars, cold = calibrate(ranges_weights='mse')
  warm = []
  for _ in range(args.cal_reps):
    qmodel, qvars, t = calibrate(ranges_weights='mse')
    warm.append(t)
  res['calibration_cold_s'], res['calibration_s'] = cold, common.median(warm)
  res['calibration_compile_s'] = cold - res['calibration_s']
  print(f"{mt}: calibration (MSE weight ranges, 4 batches) {res['calibration_s']:.2f} s after "
        f"compilation (cold {cold:.1f} s: ~{res['calibration_compile_s']:.1f} s compiling)",
        flush=True)
  i8model, i8vars, _ = calibrate(ranges_weights='current_minmax', int8=True)

  cases = {'fp': (eval_fn(model, head), variables),
           'w8a8': (eval_fn(qmodel, head), qvars),
           'int8': (eval_fn(i8model, head), i8vars)}
  compile_s = {}
  for name, (f, v) in cases.items():
    t0 = time.perf_counter()
    jax.block_until_ready(f(v, batch))
    compile_s[name] = time.perf_counter() - t0
  res['eval_compile_s'] = compile_s
  times = {k: [] for k in cases}
  names = list(cases)
  for r in range(args.reps):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      f, v = cases[name]
      t0 = time.perf_counter()
      jax.block_until_ready(f(v, batch))
      times[name].append(time.perf_counter() - t0)
  med = {k: common.median(v) for k, v in times.items()}
  res['eval_s'] = med
  res['w8a8_over_fp'] = med['w8a8'] / med['fp']
  res['int8_over_fp'] = med['int8'] / med['fp']
  print(f"{mt}: eval step FP {med['fp'] * 1e3:.0f} ms, W8A8 fake-quant {med['w8a8'] * 1e3:.0f} ms "
        f"({res['w8a8_over_fp']:.2f}x FP), int8 (AQT) {med['int8'] * 1e3:.0f} ms "
        f"({res['int8_over_fp']:.2f}x FP); first calls (compile) "
        + ', '.join(f'{k} {v:.1f} s' for k, v in compile_s.items()), flush=True)
  return res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='bert,opt')
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--cal-reps', type=int, default=2)
  p.add_argument('--shape', default='', help='override, e.g. batch=2,seq_len=16')
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  shape = dict(shapes.CPU_SHAPE)
  for kv in filter(None, args.shape.split(',')):
    k, v = kv.split('=')
    shape[k] = int(v)
  print('machine:', common.machine(), flush=True)
  rows = [run_model(mt, args, shape) for mt in args.models.split(',')]
  common.write_json(args.json, {'machine': common.machine(), 'shape': shape, 'rows': rows})
  return 0


if __name__ == '__main__':
  sys.exit(main())
