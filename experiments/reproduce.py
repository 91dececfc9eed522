"""The paper's effect, measured: train attention variants with identical data, seeds and budget,
then evaluate them in floating point and W8A8 and write a Table-2-shaped summary.

    python experiments/reproduce.py [--quick | --smoke] --out DIR [--variants a,b,...]
        [--steps N] [--set KEY=VALUE ...]

Every variant is trained by oqt_jax.train.train_and_evaluate into DIR/runs/<variant> (a rerun
resumes or reuses finished runs) and evaluated by oqt_jax.evaluate.evaluate_run (FP, then W8A8
calibrated with the config's quant settings). Outputs in DIR:
  results.json   a list, one row per variant: variant, fp_perplexity, max_inf_norm,
                 avg_kurtosis, max_kurtosis, w8a8_perplexity, w8a8_gap, bos_attention (mean
                 attention mass on the first token), no_op_mass (mass on the first token or on
                 "nothing" (softmax1 / sink) at positions that need no context), per-layer
                 figures and the training settings;
  results.md     the table in the shape of the paper's Table 2, plus the W8A8 gap;
  per_layer.png  per-layer inf norm (decoder-layer output) and kurtosis per variant;
  attention.png  per head: attention mass on the first (BOS) token, split by whether the
                 query needs context (the token after a trigger) or not (the "no-op" picture).

Setting (configs/recipes.py bigram_backcopy): a small pre-LN OPT on the synthetic
Bigram-Backcopy task (oqt_jax/data/synthetic.py). Modes differ only in the training budget and
model size (MODES below).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from configs import recipes  # noqa: E402

VARIANTS = {
    'vanilla': recipes.vanilla,
    'clipped_softmax': recipes.clipped_softmax,
    'gated_attention': recipes.gated_attention,
    'softmax1': recipes.softmax1,
    'sink': recipes.sink,
    'elementwise_gate': recipes.elementwise_gate,
    'osp': recipes.outlier_safe,
}
LABELS = {
    'vanilla': 'vanilla', 'clipped_softmax': 'clipped softmax', 'gated_attention':
    'gated attention', 'softmax1': 'softmax1 (off by one)', 'sink': 'learned sink logit',
    'elementwise_gate': 'elementwise output gate',
    'osp': 'Outlier-Safe (Muon + single-scale RMSNorm)',
}

# Budget and size per mode (applied on top of recipes.bigram_backcopy).
MODES = {
    'smoke': dict(variants=('vanilla', 'clipped_softmax'), num_train_steps=20, hidden_size=32,
                  num_layers=1, num_heads=2, intermediate_size=64, seq_length=32,
                  batch=8, eval_batches=1, eval_batch_size=8, est_num_batches=1),
    'quick': dict(variants=tuple(VARIANTS), num_train_steps=1000),
    'full': dict(variants=tuple(VARIANTS), num_train_steps=6000),
}


def build_config(variant: str, mode: str, overrides: dict | None = None):
  """The config of one variant in one mode (the same for every variant but the attention)."""
  if variant not in VARIANTS:
    raise SystemExit(f'error: --variants: unknown variant {variant!r} (known: '
                     f'{", ".join(VARIANTS)})')
  c = recipes.bigram_backcopy(VARIANTS[variant](recipes.opt_125m()))
  m = dict(MODES[mode], **(overrides or {}))
  c.num_train_steps = int(m['num_train_steps'])
  for f in ('hidden_size', 'num_layers', 'num_heads', 'intermediate_size'):
    if f in m:
      setattr(c.model, f, int(m[f]))
  if 'seq_length' in m:
    c.data.synthetic.seq_length = int(m['seq_length'])
    c.model.max_position_embeddings = int(m['seq_length'])
    c.model.softmax_T = int(m['seq_length'])
  if 'batch' in m:
    c.per_device_batch_size = c.global_batch_size = int(m['batch'])
  if 'learning_rate' in m:
    c.learning_rate = float(m['learning_rate'])
  if 'eval_batches' in m:
    c.num_eval_batches = int(m['eval_batches'])
  if 'eval_batch_size' in m:
    c.eval_batch_size = int(m['eval_batch_size'])
  if 'est_num_batches' in m:
    c.quant.est_num_batches = int(m['est_num_batches'])
  c.warmup_steps = min(c.warmup_steps, max(c.num_train_steps // 10, 1))
  for key, value in (m.get('set') or {}).items():
    apply_setting(c, key, value)
  c.eval_every_steps = 0                      # one evaluation, at the end
  c.checkpoint_every_steps = max(c.num_train_steps, 1)
  c.log_every_steps = min(c.log_every_steps, max(c.num_train_steps, 1))
  return c


def parse_setting(text: str) -> tuple[str, object]:
  """'model.num_layers=1' -> ('model.num_layers', 1): the value as a Python literal, else
  the string itself."""
  key, sep, raw = text.partition('=')
  if not sep or not key:
    raise SystemExit(f'error: --set {text!r}: expected KEY=VALUE (e.g. learning_rate=0.01)')
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return key.strip(), value


def apply_setting(config, key: str, value) -> None:
  """Set the existing dotted field `key` of `config` (an unknown field is an error naming it)."""
  node = config
  *path, last = key.split('.')
  for part in path:
    if part not in node:
      raise SystemExit(f'error: --set {key}: no field {part!r}')
    node = node[part]
  if last not in node:
    raise SystemExit(f'error: --set {key}: no field {last!r}')
  with node.unlocked():
    node[last] = value


# ---------------------------------------------------------------------------- attention
def attention_mass(config, workdir: str, num_batches: int = 1) -> dict:
  """Per layer and head, the attention mass on the first (BOS) token, on the query's own
  position ('self') and on "nothing" (1 - the row's sum: what softmax1 / sink leave out and clipped softmax clips away; 0 for a
  plain softmax), averaged over the queries t >= 1 that need no context (the current token is
  not a trigger: 'plain') and those that do (it is: 'copy', the next token repeats the
  previous one). The attention module sows the probabilities into the 'attention'
  collection."""
  import jax
  from oqt_jax.data import synthetic
  from oqt_jax.evaluate.setup import load_model
  model, variables, _ = load_model(config, workdir)
  ds = synthetic.SyntheticDataset(config.data, seed=config.seed)
  bs = int(config.eval_batch_size)
  apply = jax.jit(lambda v, ids: model.apply(v, ids, mutable=['attention'])[1]['attention'])
  sums = None
  for b, batch in enumerate(ds.eval_batches(bs, num_batches)):
    ids = batch['input_ids']
    col = jax.device_get(apply({'params': variables['params']}, ids))
    copy = synthetic.copy_positions(ids, config.data)              # (B, T)
    plain = ~copy
    plain[:, 0] = False
    layers = sorted(col, key=lambda k: int(k.rsplit('_', 1)[-1]))
    cur = []
    for name in layers:
      p = np.asarray(col[name]['attention']['probs'][0], np.float64)   # (B, H, T, T)
      bos = p[..., 0]                                                  # (B, H, T)
      nothing = 1.0 - p.sum(-1)
      t = np.arange(p.shape[-1])
      own = p[..., t, t]                                               # on the query itself
      stats = []
      for sel in (plain, copy):
        w = sel[:, None, :].astype(np.float64)       # (B, 1, T): the same queries per head
        n = max(w.sum(), 1.0)
        stats.append(((bos * w).sum((0, 2)) / n, (nothing * w).sum((0, 2)) / n,
                      (own * w).sum((0, 2)) / n))
      cur.append(stats)
    sums = cur if sums is None else [[tuple(a + b for a, b in zip(s0, s1)) for s0, s1 in
                                      zip(l0, l1)] for l0, l1 in zip(sums, cur)]
  n = max(b + 1, 1)
  out = {'bos_plain': [], 'nothing_plain': [], 'self_plain': [], 'bos_copy': [],
         'nothing_copy': [], 'self_copy': []}
  for layer in sums:
    (bp, np_, sp), (bc, nc, sc) = layer
    for key, v in (('bos_plain', bp), ('nothing_plain', np_), ('self_plain', sp),
                   ('bos_copy', bc), ('nothing_copy', nc), ('self_copy', sc)):
      out[key].append((v / n).tolist())
  return out


# ---------------------------------------------------------------------------- one variant
def run_variant(variant: str, mode: str, out: str, overrides: dict | None = None,
                progress: bool = False) -> dict:
  from oqt_jax.evaluate.run import evaluate_run
  from oqt_jax.train import train_and_evaluate
  config = build_config(variant, mode, overrides)
  workdir = os.path.join(out, 'runs', variant)
  t0 = time.time()
  summary = train_and_evaluate(config, workdir, progress=progress)
  train_s = time.time() - t0
  res = evaluate_run(config, workdir, quantize=True, plots_on=False, progress=False,
                     num_batches=int(config.num_eval_batches),
                     batch_size=int(config.eval_batch_size))
  q = res['quantized']
  att = attention_mass(config, workdir, num_batches=1)
  fp_ppl, q_ppl = float(res['perplexity']), float(q['perplexity'])
  mean = lambda a: float(np.mean(a))
  return {
      'variant': variant,
      'fp_perplexity': fp_ppl,
      'max_inf_norm': float(res['max_inf_norm']),
      'avg_kurtosis': float(res['avg_kurtosis']),
      'max_kurtosis': float(res['max_kurtosis']),
      'w8a8_perplexity': q_ppl,
      'w8a8_gap': q_ppl - fp_ppl,
      'bos_attention': mean(att['bos_plain']),
      'no_op_mass': mean(np.asarray(att['bos_plain']) + np.asarray(att['nothing_plain'])),
      'self_attention': mean(att['self_plain']),
      'attention': att,
      'per_layer': res['per_layer'],
      'per_layer_w8a8': q['per_layer'],
      'train_steps': int(summary['step']),
      'train_seconds': round(train_s, 1),
      'config': {'model': {k: config.model[k] for k in (
          'hidden_size', 'num_layers', 'num_heads', 'intermediate_size', 'softmax', 'alpha',
          'softmax_T', 'gate', 'gate_init', 'attention_init')},
                 'synthetic': config.data.synthetic.to_dict(),
                 'learning_rate': config.learning_rate, 'batch': config.global_batch_size,
                 'seed': config.seed},
  }


# ---------------------------------------------------------------------------- outputs
def fmt(x, nd=2):
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return str(x)
  return f'{x:.{nd}f}' if abs(x) < 1e5 else f'{x:.3g}'


def write_markdown(rows: list, path: str, mode: str) -> str:
  lines = [f'Bigram-Backcopy, mode `{mode}` (FP / W8A8 perplexity on the validation split; '
           'max inf norm of the decoder-layer output, max over layers; kurtosis averaged over '
           'the measured tensors; BOS mass = mean attention on the first token at positions '
           'that need no context; self mass = mean attention of those positions on themselves)',
           '', '| method | FP ppl | max inf norm | avg kurtosis | max kurtosis | W8A8 ppl | '
           'W8A8 gap | BOS mass | no-op mass | self mass |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {LABELS.get(r['variant'], r['variant'])} | {fmt(r['fp_perplexity'], 3)} "
                 f"| {fmt(r['max_inf_norm'])} | {fmt(r['avg_kurtosis'])} "
                 f"| {fmt(r['max_kurtosis'])} | {fmt(r['w8a8_perplexity'], 3)} "
                 f"| {fmt(r['w8a8_gap'], 3)} | {fmt(r['bos_attention'])} "
                 f"| {fmt(r['no_op_mass'])} | {fmt(r.get('self_attention'))} |")
  return write_lines(lines, path)


def write_lines(lines: list, path: str) -> str:
  """The lines as one text file (a trailing newline); returns the text."""
  text = '\n'.join(lines) + '\n'
  with open(path, 'w') as fh:
    fh.write(text)
  return text


def write_plots(rows: list, out: str) -> list[str]:
  import matplotlib
  matplotlib.use('Agg', force=True)
  import matplotlib.pyplot as plt
  files = []
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for r in rows:
    layers = [p['layer'] for p in r['per_layer']]
    inf = [p.get('layer_output', {}).get('inf_norm', float('nan')) for p in r['per_layer']]
    kur = [np.nanmean([v['kurtosis'] for v in p.values() if isinstance(v, dict)
                       and 'kurtosis' in v]) for p in r['per_layer']]
    axes[0].plot(layers, inf, '-o', label=LABELS.get(r['variant'], r['variant']))
    axes[1].plot(layers, kur, '-o', label=LABELS.get(r['variant'], r['variant']))
  axes[0].set_title('inf norm of the decoder-layer output')
  axes[1].set_title('kurtosis (mean over measured tensors)')
  for ax in axes:
    ax.set_xlabel('layer')
    ax.set_yscale('log')
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  files.append(os.path.join(out, 'per_layer.png'))
  fig.savefig(files[-1], dpi=110)
  plt.close(fig)

  n = len(rows)
  fig, axes = plt.subplots(2, n, figsize=(2.6 * n + 1, 5.5), squeeze=False,
                           constrained_layout=True)
  for j, r in enumerate(rows):
    for i, key in enumerate(('plain', 'copy')):
      mass = np.asarray(r['attention'][f'bos_{key}']) + np.asarray(r['attention'][f'nothing_{key}'])
      ax = axes[i, j]
      im = ax.imshow(mass, vmin=0, vmax=1, cmap='viridis', aspect='auto')
      ax.set_title(f"{LABELS.get(r['variant'], r['variant'])}\n"
                   f"{'no context needed' if key == 'plain' else 'after a trigger'}", fontsize=8)
      ax.set_xticks(range(mass.shape[1]))
      ax.set_yticks(range(mass.shape[0]))
      ax.set_xlabel('head')
      if j == 0:
        ax.set_ylabel('layer')
  fig.colorbar(im, ax=axes, shrink=0.8, label='mass on BOS (+ "nothing")')
  files.append(os.path.join(out, 'attention.png'))
  fig.savefig(files[-1], dpi=110)
  plt.close(fig)
  return files


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  g = ap.add_mutually_exclusive_group()
  g.add_argument('--quick', action='store_true', help='the short budget (minutes on 2 cores)')
  g.add_argument('--smoke', action='store_true', help='2 variants, a few steps (tests)')
  ap.add_argument('--out', required=True, help='output folder')
  ap.add_argument('--variants', default='', help='comma-separated subset of ' +
                  ', '.join(VARIANTS))
  ap.add_argument('--steps', type=int, default=0, help='override the number of training steps')
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                  help='override a config field for every variant (dotted path, Python '
                  'literal), e.g. --set learning_rate=0.01 --set model.num_layers=1; repeatable')
  ap.add_argument('--progress', action='store_true', help='show training progress bars')
  ap.add_argument('--report', action='store_true',
                  help='only rewrite results.md and the plots from DIR/results.json')
  args = ap.parse_args(argv)
  mode = 'smoke' if args.smoke else 'quick' if args.quick else 'full'
  variants = tuple(v for v in args.variants.split(',') if v) or MODES[mode]['variants']
  overrides = {'num_train_steps': args.steps} if args.steps > 0 else {}
  if args.set:
    overrides['set'] = dict(parse_setting(t) for t in args.set)
    build_config(variants[0], mode, overrides)      # unknown fields fail before any training
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  if args.report:
    with open(os.path.join(out, 'results.json')) as fh:
      rows = json.load(fh)
    for r in rows:     # attention figures recomputed from the trained runs (cheap)
      config = build_config(r['variant'], mode, overrides)
      att = attention_mass(config, os.path.join(out, 'runs', r['variant']))
      r['attention'] = att
      r['bos_attention'] = float(np.mean(att['bos_plain']))
      r['no_op_mass'] = float(np.mean(np.asarray(att['bos_plain'])
                                      + np.asarray(att['nothing_plain'])))
    with open(os.path.join(out, 'results.json'), 'w') as fh:
      json.dump(rows, fh, indent=1)
    print(write_markdown(rows, os.path.join(out, 'results.md'), mode))
    write_plots(rows, out)
    return 0
  rows = []
  from tqdm import tqdm
  for v in tqdm(variants, desc=f'variants ({mode})', file=sys.stderr):
    rows.append(run_variant(v, mode, out, overrides, progress=args.progress))
    with open(os.path.join(out, 'results.json'), 'w') as fh:
      json.dump(rows, fh, indent=1)
  text = write_markdown(rows, os.path.join(out, 'results.md'), mode)
  write_plots(rows, out)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
