"""Convert a pretrained checkpoint into the outlier-free form by distillation, and measure it.

    python experiments/convert.py --hf_model DIR --out DIR [--quick | --smoke]
        [--variants vanilla,gated,clipped] [--set KEY=VALUE ...]

Every variant (configs/convert/*.py: vanilla = the control, gated = gated attention in
fine-tuning mode, clipped = clipped softmax) starts from the checkpoint DIR and is trained by
oqt_jax.train.train_and_evaluate with config.loss='distill' (the teacher: DIR, frozen) into
OUT/runs/<variant> with the same data, steps and seed (a rerun resumes or reuses finished
runs). Then every model, the original included, is evaluated on the same held-out batches of
the validation split (masked tokens restored: the text as written):
  fp_cosine           mean cosine of its mean-pooled final hidden states to the original's;
  max_inf_norm, avg_kurtosis, max_kurtosis   the outlier table's summary (oqt_jax.evaluate);
  w8a8_cosine_all     W8A8 per-tensor, every quantization point (config.quant defaults),
                      cosine of the mean-pooled states to the original FP model's;
  w8a8_cosine_matmul  the same with quant_setup='matmul_inputs' (only the inputs of matmuls);
  per-layer inf norms, the attention mass on delimiter tokens and the no-op heads
  (oqt_jax/evaluate/analysis.py), for the gated model the mean gate per head.
Outputs in OUT: results.json (one row per variant: original, vanilla, gated, clipped),
results.md (the table and the mechanism lines), per_layer.png, analysis_<variant>.json.
--smoke: a tiny BERT made with transformers, a few steps (the test suite runs it).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from configs.convert import common  # noqa: E402

VARIANTS = common.VARIANTS
LABELS = {'original': 'original checkpoint', 'vanilla': 'vanilla (control)',
          'gated': 'gated attention (fine-tuning mode)', 'clipped': 'clipped softmax'}
MODES = {
    'full': dict(),
    'quick': dict(num_train_steps=30, warmup_steps=3),
    'smoke': dict(num_train_steps=4, warmup_steps=1, per_device_batch_size=4,
                  global_batch_size=4, checkpoint_every_steps=2, log_every_steps=2,
                  max_seq_length=32),
}
EVAL = {'full': (16, 4), 'quick': (16, 2), 'smoke': (4, 1)}   # (batch size, batches)


def make_tiny_bert(path: str) -> str:
  """A 2-layer, 32-wide BertModel with a word-level tokenizer of the embedded corpus's
  commonest words (random weights, torch seed 0), saved as an HF dir."""
  import torch
  import transformers
  from oqt_jax.data import sources
  words: dict[str, int] = {}
  for doc in sources.embedded_documents()[:200]:
    for w in doc.lower().split():
      if w.isalpha():
        words[w] = words.get(w, 0) + 1
  common_words = [w for w, _ in sorted(words.items(), key=lambda kv: -kv[1])][:200]
  base = ['the', 'of', 'and', 'to', 'a', 'in', 'is', 'was', 'it', 'for', '.', ',', ';', '(',
          ')', "'", '-']
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + list(dict.fromkeys(base + common_words))
  tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
  cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64)
  torch.manual_seed(0)
  transformers.BertModel(cfg).eval().save_pretrained(path)
  tok.save_pretrained(path)
  return path


def variant_config(variant: str, hf_model: str, mode: str, sets=()):
  with open(os.path.join(hf_model, 'config.json')) as fh:
    mtype = 'opt' if json.load(fh).get('model_type') == 'opt' else 'bert'
  c = common.convert(variant, mtype)
  c.init_from = hf_model
  for k, v in MODES[mode].items():
    if k == 'max_seq_length':
      c.data.max_seq_length = c.data.block_size = c.model.softmax_T = v
    else:
      c[k] = v
  for kv in sets:
    k, v = kv.split('=', 1)
    try:
      v = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      pass
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _pooled(h, mask):
  m = mask[..., None].astype(np.float32)
  return (np.asarray(h, np.float32) * m).sum(1) / np.maximum(m.sum(1), 1.0)


def _cos(a, b):
  return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) *
                                            np.linalg.norm(b, axis=-1) + 1e-12)))


def _final_states(model, variables, batches):
  import jax
  keys = ('input_ids', 'attention_mask', 'token_type_ids')
  keys = keys if model.cfg.model_type == 'bert' else keys[:2]
  fwd = jax.jit(lambda v, x: model.apply(v, **x, deterministic=True).last_hidden_state)
  return [_pooled(jax.device_get(fwd(variables, {k: b[k] for k in keys if k in b})),
                  b['attention_mask']) for b in batches]


def _unmasked(batches):
  """The MLM batches with the masked / replaced tokens restored (labels hold the originals)."""
  out = []
  for b in batches:
    b = {k: np.asarray(v) for k, v in b.items()}
    if 'labels' in b and b['labels'].shape == b['input_ids'].shape:
      b['input_ids'] = np.where(b['labels'] != -100, b['labels'], b['input_ids'])
    out.append(b)
  return out


def _gate_means(model, variables, batches):
  """(L, H) mean gate value over valid tokens (gated models), else None."""
  import jax
  if model.cfg.gate == 'none':
    return None
  keys = ('input_ids', 'attention_mask', 'token_type_ids')
  sums = None
  n = 0.0
  for b in batches:
    _, col = model.apply(variables, **{k: b[k] for k in keys if k in b}, deterministic=True,
                         mutable=['intermediates'])
    col = jax.device_get(col['intermediates'])
    m = np.asarray(b['attention_mask'], np.float32)
    per = []
    for i in range(model.cfg.num_layers):
      lay = col.get(f'encoder_layer_{i}', col.get(f'decoder_layer_{i}', {}))
      g = np.asarray(lay['attention']['gate_probs'][0])[..., 0]        # (B, H, T)
      g = np.broadcast_to(g, (m.shape[0], g.shape[1], m.shape[1]))
      per.append((g * m[:, None, :]).sum(axis=(0, 2)))
    per = np.stack(per)
    sums = per if sums is None else sums + per
    n += m.sum()
  return sums / max(n, 1.0)


def evaluate_model(name, model, variables, batches, cal_batches, ref_pooled, base_config,
                   tokenizer, out_dir):
  from oqt_jax.evaluate import analysis, outliers
  from oqt_jax.quant import methods
  stats = outliers.evaluate(model, variables, batches, num_batches=len(batches), progress=False)
  pooled = _final_states(model, variables, batches)
  row = {'variant': name,
         'fp_cosine': float(np.mean([_cos(a, b) for a, b in zip(pooled, ref_pooled)])),
         'max_inf_norm': float(stats['max_inf_norm']),
         'avg_kurtosis': float(stats['avg_kurtosis']),
         'max_kurtosis': float(stats['max_kurtosis'])}
  for quant_setup, key in (('all', 'w8a8_cosine_all'), ('matmul_inputs', 'w8a8_cosine_matmul')):
    qcfg = base_config.quant.copy_and_resolve_references()
    with qcfg.unlocked():
      qcfg.quant_setup = quant_setup
    qmodel, qvars, _ = methods.run('', model, variables, iter(cal_batches), qcfg,
                                   progress=False)
    qp = _final_states(qmodel, qvars, batches)
    row[key] = float(np.mean([_cos(a, b) for a, b in zip(qp, ref_pooled)]))
  res = analysis.analyze_model(model, variables, batches, tokenizer, out_dir, plots_on=False)
  os.replace(os.path.join(out_dir, 'analysis.json'),
             os.path.join(out_dir, f'analysis_{name}.json'))
  row['per_layer_inf_norm'] = [lay['max_inf_norm'] for lay in res['layers']]
  row['per_layer_outlier_dims'] = [[d['dim'] for d in lay['outlier_dims'][:4]]
                                   for lay in res['layers']]
  row['per_layer_outlier_tokens'] = [[t['token'] for t in lay['outlier_tokens'][:4]]
                                     for lay in res['layers']]
  row['delimiter_mass'] = res['delimiter_mass_mean']
  row['delimiter_mass_per_head'] = [[h['mass_delimiter'] for h in res['heads']
                                     if h['layer'] == i] for i in range(len(res['layers']))]
  row['no_op_heads'] = res['no_op_heads'][:5]
  g = _gate_means(model, variables, batches)
  if g is not None:
    row['gate_mean_per_head'] = g.tolist()
  return row


def write_markdown(rows, meta, path):
  cols = ('fp_cosine', 'max_inf_norm', 'avg_kurtosis', 'max_kurtosis', 'w8a8_cosine_all',
          'w8a8_cosine_matmul', 'delimiter_mass')
  lines = [f'Conversion of `{meta["hf_model_name"]}` by distillation: {meta["steps"]} steps of '
           f'{meta["batch"]} x {meta["seq_len"]} tokens, lr {meta["lr"]}, seed {meta["seed"]}, '
           f'{meta["source"]} text; evaluated on {meta["eval_sequences"]} held-out sequences '
           f'({meta["train_seconds"]:.0f} s training, {meta["cores"]} CPU cores).', '',
           '| variant | ' + ' | '.join(cols) + ' |', '|' + '---|' * (len(cols) + 1)]
  for r in rows:
    lines.append(f'| {r["variant"]} | ' + ' | '.join(
        f'{r[c]:.4f}' if c in ('fp_cosine', 'w8a8_cosine_all', 'w8a8_cosine_matmul',
                               'delimiter_mass') else f'{r[c]:.1f}' for c in cols) + ' |')
  lines += ['', 'Per-layer max inf norm (outlier tensor):', '']
  n = len(rows[0]['per_layer_inf_norm'])
  lines += ['| variant | ' + ' | '.join(f'L{i}' for i in range(n)) + ' |',
            '|' + '---|' * (n + 1)]
  for r in rows:
    lines.append(f'| {r["variant"]} | ' + ' | '.join(f'{v:.1f}' for v in r['per_layer_inf_norm'])
                 + ' |')
  orig = rows[0]
  lines += ['', 'Mechanism (original checkpoint): outlier dims and the tokens they occur at, per '
            'layer:', '']
  for i, (d, t) in enumerate(zip(orig['per_layer_outlier_dims'], orig['per_layer_outlier_tokens'])):
    lines.append(f'- layer {i}: dims {d or "-"}; tokens {t or "-"}')
  heads = ', '.join(f'L{h["layer"]}H{h["head"]} (mass {h["mass_delimiter"]:.2f})'
                    for h in orig['no_op_heads'])
  lines += ['', f'- no-op heads of the original (delimiter mass x low value norm): {heads}']
  for r in rows:
    if 'gate_mean_per_head' in r:
      g = np.asarray(r['gate_mean_per_head'])
      sel = [g[h['layer'], h['head']] for h in orig['no_op_heads']]
      lines.append(f'- {r["variant"]}: mean gate (x 1/gate_init) on those heads '
                   f'{np.mean(sel):.3f}, on all heads {g.mean():.3f} (1.0 = open, the start)')
  with open(path, 'w') as fh:
    fh.write('\n'.join(lines) + '\n')


def plot_per_layer(rows, path):
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for r in rows:
    a.plot(r['per_layer_inf_norm'], marker='o', label=r['variant'])
    b.plot([np.mean(x) for x in r['delimiter_mass_per_head']], marker='o', label=r['variant'])
  a.set_xlabel('layer'), a.set_ylabel('max inf norm'), a.set_title('outliers per layer')
  b.set_xlabel('layer'), b.set_ylabel('mean attention mass on delimiters')
  b.set_title('delimiter attention per layer')
  a.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--hf_model', help='pretrained HF checkpoint dir (with its tokenizer)')
  ap.add_argument('--out', required=True)
  g = ap.add_mutually_exclusive_group()
  g.add_argument('--quick', action='store_true')
  g.add_argument('--smoke', action='store_true')
  ap.add_argument('--variants', default=','.join(VARIANTS))
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  args = ap.parse_args(argv)
  mode = 'smoke' if args.smoke else 'quick' if args.quick else 'full'
  from oqt_jax.errors import ConfigError, DataError, CheckpointError
  try:
    return _run(args, mode)
  except (ConfigError, DataError, CheckpointError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2


def _run(args, mode):
  from oqt_jax.errors import ConfigError
  from oqt_jax import data as data_lib
  from oqt_jax.evaluate import setup
  from oqt_jax.models import hf
  from oqt_jax.train import train_and_evaluate
  variants = [v.strip() for v in args.variants.split(',') if v.strip()]
  for v in variants:
    if v not in VARIANTS:
      raise ConfigError(f'--variants: {v!r} is not one of {VARIANTS}')
  os.makedirs(args.out, exist_ok=True)
  hf_model = args.hf_model
  if mode == 'smoke' and not hf_model:
    hf_model = os.path.join(args.out, 'tiny_bert')
    if not os.path.exists(os.path.join(hf_model, 'config.json')):
      make_tiny_bert(hf_model)
  if not hf_model or not os.path.exists(os.path.join(hf_model, 'config.json')):
    raise ConfigError(f'--hf_model={hf_model}: not an HF checkpoint dir (no config.json)')
  hf_model = os.path.abspath(hf_model)
  t_train = 0.0
  runs = {}
  for v in variants:
    c = variant_config(v, hf_model, mode, args.set)
    t0 = time.time()
    print(f'== {v}: {c.num_train_steps} steps', flush=True)
    train_and_evaluate(c, os.path.join(args.out, 'runs', v), progress=False)
    t_train += time.time() - t0
    runs[v] = c

  # held-out batches (validation split, the checkpoint's tokenizer), the same for every model
  c0 = variant_config('vanilla', hf_model, mode, args.set)
  teacher, tvars = hf.load(hf_model)
  c0 = setup.sync_config(c0, teacher, hf_model)
  tok = data_lib.get_tokenizer(c0, os.path.join(args.out, 'runs', 'vanilla'))
  bs, nb = EVAL[mode]
  val = data_lib.build_dataset(c0, tok, 'validation', os.path.join(args.out, 'runs', 'vanilla'))
  nb = min(nb, val.num_eval_batches(bs))
  batches = _unmasked(list(val.eval_batches(bs, nb)))
  train = data_lib.build_dataset(c0, tok, 'train', os.path.join(args.out, 'runs', 'vanilla'))
  cal = _unmasked([train.batch(s, bs) for s in range(int(c0.quant.est_num_batches))])
  ref = _final_states(teacher, tvars, batches)
  rows = [evaluate_model('original', teacher, tvars, batches, cal, ref, c0, tok, args.out)]
  for v in variants:
    model, variables, _ = setup.load_model(runs[v], os.path.join(args.out, 'runs', v))
    rows.append(evaluate_model(v, model, variables, batches, cal, ref, c0, tok, args.out))
  meta = {'hf_model_name': os.path.basename(hf_model.rstrip('/')), 'mode': mode,
          'steps': int(c0.num_train_steps), 'batch': int(c0.per_device_batch_size),
          'seq_len': int(c0.data.max_seq_length), 'lr': float(c0.learning_rate),
          'seed': int(c0.seed), 'source': c0.data.source,
          'eval_sequences': int(sum(b['input_ids'].shape[0] for b in batches)),
          'train_seconds': t_train, 'cores': os.cpu_count()}
  with open(os.path.join(args.out, 'results.json'), 'w') as fh:
    json.dump([dict(r, settings=meta) for r in rows], fh, indent=1)
  write_markdown(rows, meta, os.path.join(args.out, 'results.md'))
  plot_per_layer(rows, os.path.join(args.out, 'per_layer.png'))
  with open(os.path.join(args.out, 'results.md')) as fh:
    print(fh.read())
  return 0


if __name__ == '__main__':
  sys.exit(main())
