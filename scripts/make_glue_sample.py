"""Write small GLUE-format tasks built from the embedded corpus (no network).

  python scripts/make_glue_sample.py OUT_DIR

OUT_DIR/cola/{train,dev}.tsv   acceptability ("CoLA" format, no header): label 1 = a sentence of
                                the corpus as written, 0 = the sentence with three of its words
                                replaced by random words of other sentences.
OUT_DIR/mrpc/{train,dev}.tsv   paraphrase ("MRPC" format): label 1 = the sentence with two
                                words dropped, 0 = the next sentence of the same paragraph.

Sentences of 8-20 words are cut from the embedded corpus (Python's help texts, the text the
tiny configs pretrain on) and split 80 / 20 into train / dev by a hash of their text, so the
split does not depend on the order or the seed. These are synthetic probes of the fine-tuning
and quantization pipeline, not GLUE: the figures they give say nothing about GLUE accuracy.
"""
import hashlib
import os
import re
import sys

import numpy as np

from oqt_jax.data import sources

_SENT = re.compile(r'(?<=[.!?])\s+')


def corpus_sentences():
  """(paragraph index, sentence) of the embedded corpus, 8-20 words, tabs removed."""
  out = []
  for p, doc in enumerate(sources.embedded_documents()):
    for s in _SENT.split(doc):
      s = s.replace('\t', ' ').strip()
      if 8 <= len(s.split()) <= 20 and s[0].isalpha():
        out.append((p, s))
  return out


def _is_dev(s: str) -> bool:
  return hashlib.sha1(s.encode()).digest()[0] < 256 * 0.2


def write_tasks(out_dir: str, seed: int = 0):
  rng_cola = np.random.default_rng((seed, 0))     # one stream per task: each task's files do
  rng_mrpc = np.random.default_rng((seed, 1))     # not depend on how the other is made
  sents = corpus_sentences()
  rows = {'cola': {'train': [], 'dev': []}, 'mrpc': {'train': [], 'dev': []}}
  for i, (p, s) in enumerate(sents):
    split = 'dev' if _is_dev(s) else 'train'
    words = s.split()
    bad = list(words)
    for j in rng_cola.choice(len(words), 3, replace=False):
      other = sents[rng_cola.integers(len(sents))][1].split()
      bad[j] = other[rng_cola.integers(len(other))]
    rows['cola'][split].append(f'corpus\t1\t\t{s}')
    rows['cola'][split].append(f'corpus\t0\t*\t{" ".join(bad)}')
    drop = set(rng_mrpc.choice(len(words), 2, replace=False).tolist())
    short = ' '.join(w for j, w in enumerate(words) if j not in drop)
    rows['mrpc'][split].append(f'1\t{2 * i}\t{2 * i + 1}\t{s}\t{short}')
    if i + 1 < len(sents) and sents[i + 1][0] == p:
      rows['mrpc'][split].append(f'0\t{2 * i}\t{2 * i + 2}\t{s}\t{sents[i + 1][1]}')
  for task, splits in rows.items():
    rng = rng_cola if task == 'cola' else rng_mrpc
    folder = os.path.join(out_dir, task)
    os.makedirs(folder, exist_ok=True)
    for split, lines in splits.items():
      lines = [lines[j] for j in rng.permutation(len(lines))]
      header = [] if task == 'cola' else ['Quality\t#1 ID\t#2 ID\t#1 String\t#2 String']
      with open(os.path.join(folder, f'{split}.tsv'), 'w', encoding='utf-8') as f:
        f.write(''.join(line + '\n' for line in header + lines))
      print(f'{folder}/{split}.tsv: {len(lines)} rows')


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python scripts/make_glue_sample.py OUT_DIR')
  write_tasks(sys.argv[1])
