"""The tiny models of configs/tiny_*.py trained on the embedded corpus, evaluated in FP and W8A8.

    python experiments/tiny_models.py --out results/tiny [--configs a,b,...] [--steps N]

Each config (default: all six tiny_{opt,bert}_{vanilla,clipped_softmax,gated_attention}) is
trained by oqt_jax.train.train_and_evaluate into OUT/runs/<name> (a rerun resumes or reuses a
finished run) and evaluated by oqt_jax.evaluate.evaluate_run with --quantize's defaults (the
config's quant settings: per-tensor W8A8, fp32_head). Outputs in OUT:
  results.json  one row per config: FP perplexity, max inf norm, avg / max kurtosis, W8A8
                perplexity, the training steps and seconds;
  results.md    the table docs/results.md includes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments.reproduce import fmt, write_lines  # noqa: E402

CONFIGS = ('tiny_opt_vanilla', 'tiny_opt_clipped_softmax', 'tiny_opt_gated_attention',
           'tiny_bert_vanilla', 'tiny_bert_clipped_softmax', 'tiny_bert_gated_attention')


def attention_label(model) -> str:
  """What the attention of config.model is, in the table's words."""
  gate = model.get('gate', 'none')
  if gate != 'none':
    how = 'MLP gate' if model.get('gate_mlp', False) else f"init {model.get('gate_init', 0.5):g}"
    return f"gated attention ({gate.replace('conditional_', '').replace('_', ' ')}, {how})"
  alpha = float(model.get('alpha', -1.0) or -1.0)
  if alpha > 0:
    return f"clipped softmax (alpha {alpha:g}, T {model.get('softmax_T', 0):g})"
  softmax = str(model.get('softmax', 'vanilla'))
  if softmax.startswith('clipped(') and softmax.endswith(')'):
    return f'clipped softmax ({softmax[len("clipped("):-1]})'
  if softmax != 'vanilla':
    return softmax
  return 'vanilla'


def run_config(name: str, out: str, steps: int = 0) -> dict:
  from oqt_jax.config import load_config_file
  from oqt_jax.evaluate.run import evaluate_run
  from oqt_jax.train import train_and_evaluate
  config = load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
  if steps:
    config.num_train_steps = steps
    config.warmup_steps = min(int(config.warmup_steps), max(steps // 10, 1))
  workdir = os.path.join(out, 'runs', name)
  t0 = time.time()
  summary = train_and_evaluate(config, workdir, progress=False)
  train_s = time.time() - t0
  res = evaluate_run(config, workdir, quantize=True, plots_on=False, progress=False)
  m = config.model
  return {
      'config': name,
      'model': f"tiny {m.model_type.upper()} ({m.num_layers}L, {m.hidden_size})",
      'attention': attention_label(m),
      'fp_perplexity': float(res['perplexity']),
      'max_inf_norm': float(res['max_inf_norm']),
      'avg_kurtosis': float(res['avg_kurtosis']),
      'max_kurtosis': float(res['max_kurtosis']),
      'w8a8_perplexity': float(res['quantized']['perplexity']),
      'train_steps': int(summary['step']),
      'train_seconds': round(train_s, 1),
  }


def write_markdown(rows: list, path: str) -> str:
  lines = ['| model | attention | FP ppl | max inf norm | avg kurtosis | max kurtosis | W8A8 ppl '
           '| steps | train s |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['model']} | {r['attention']} | {fmt(r['fp_perplexity'])} | "
                 f"{fmt(r['max_inf_norm'])} | {fmt(r['avg_kurtosis'])} | "
                 f"{fmt(r['max_kurtosis'])} | {fmt(r['w8a8_perplexity'])} | "
                 f"{r['train_steps']} | {r['train_seconds']:.0f} |")
  return write_lines(lines, path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--out', required=True, help='output folder')
  ap.add_argument('--configs', default=','.join(CONFIGS),
                  help='comma-separated subset of ' + ', '.join(CONFIGS))
  ap.add_argument('--steps', type=int, default=0,
                  help='override the number of training steps (default: the config\'s)')
  args = ap.parse_args(argv)
  names = [n for n in args.configs.split(',') if n]
  bad = [n for n in names if n not in CONFIGS]
  if bad:
    print(f'error: --configs: unknown {bad[0]!r} (known: {", ".join(CONFIGS)})', file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for n in names:
    print(f'{n}: training and evaluating', file=sys.stderr, flush=True)
    rows.append(run_config(n, args.out, args.steps))
  with open(os.path.join(args.out, 'results.json'), 'w') as fh:
    json.dump(rows, fh, indent=1)
  print(write_markdown(rows, os.path.join(args.out, 'results.md')))
  return 0


if __name__ == '__main__':
  sys.exit(main())
