"""Write small GLUE-format tasks built from the embedded corpus (no network).

  python scripts/make_glue_sample.py OUT_DIR

OUT_DIR/cola/{train,dev}.tsv   acceptability ("CoLA" format, no header): label 1 = a sentence of
                                the corpus as written, 0 = the sentence with three of its words
                                replaced by random words of other sentences.
OUT_DIR/mrpc/{train,dev}.tsv   paraphrase ("MRPC" format): label 1 = the sentence with two
                                words dropped, 0 = the next sentence of the same paragraph.
OUT_DIR/sst2/{train,dev}.tsv   sentiment ("SST-2" format, header sentence/label): three rows per
                                sentence, each the sentence with words of POSITIVE and NEGATIVE
                                inserted at random places, (majority, minority) counts drawn from
                                SENTIMENT_COUNTS; label 1 = more positive than negative words,
                                then flipped with probability SST2_LABEL_NOISE (so an exact
                                model scores about 95% accuracy, not 100%).

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


# Sentiment words of the SST-2-format probe: none occurs in the embedded corpus, so a row's
# label is decided by the inserted words alone (sst2_label counts them anyway).
POSITIVE = ('good', 'great', 'nice', 'happy', 'lovely', 'superb', 'proud', 'cool', 'neat',
            'glad', 'bright', 'sweet')
NEGATIVE = ('poor', 'sad', 'ugly', 'awful', 'nasty', 'bitter', 'dull', 'grim', 'hate', 'worse',
            'rude', 'cruel')
SENTIMENT_COUNTS = ((1, 0), (2, 0), (2, 1), (3, 1))   # (majority, minority) words inserted
SST2_ROWS_PER_SENTENCE = 3
SST2_LABEL_NOISE = 0.05
_WORD = re.compile(r"[a-z]+")


def sst2_label(text: str) -> int:
  """The rule (before label noise): 1 if the text holds more POSITIVE than NEGATIVE words."""
  words = _WORD.findall(text.lower())
  pos = sum(w in POSITIVE for w in words)
  neg = sum(w in NEGATIVE for w in words)
  if pos == neg:
    raise ValueError(f'tie ({pos} positive, {neg} negative words): {text!r}')
  return int(pos > neg)


def sst2_row(words: list, rng) -> tuple:
  """(text, label without noise, label) of one sentiment row built on a sentence's words."""
  label = int(rng.integers(2))
  major, minor = SENTIMENT_COUNTS[rng.integers(len(SENTIMENT_COUNTS))]
  lists = (NEGATIVE, POSITIVE)
  inserts = ([lists[label][rng.integers(12)] for _ in range(major)]
             + [lists[1 - label][rng.integers(12)] for _ in range(minor)])
  out = list(words)
  for w in inserts:
    out.insert(int(rng.integers(len(out) + 1)), w)
  text = ' '.join(out)
  clean = sst2_label(text)
  noisy = 1 - clean if rng.random() < SST2_LABEL_NOISE else clean
  return text, clean, noisy


def _is_dev(s: str) -> bool:
  return hashlib.sha1(s.encode()).digest()[0] < 256 * 0.2


def write_tasks(out_dir: str, seed: int = 0):
  rng_cola = np.random.default_rng((seed, 0))     # one stream per task: each task's files do
  rng_mrpc = np.random.default_rng((seed, 1))     # not depend on how the others are made
  rng_sst2 = np.random.default_rng((seed, 2))
  rngs = {'cola': rng_cola, 'mrpc': rng_mrpc, 'sst2': rng_sst2}
  sents = corpus_sentences()
  rows = {t: {'train': [], 'dev': []} for t in rngs}
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
    for _ in range(SST2_ROWS_PER_SENTENCE):
      text, _, label = sst2_row(words, rng_sst2)
      rows['sst2'][split].append(f'{text}\t{label}')
  headers = {'cola': [], 'mrpc': ['Quality\t#1 ID\t#2 ID\t#1 String\t#2 String'],
             'sst2': ['sentence\tlabel']}
  for task, splits in rows.items():
    rng = rngs[task]
    folder = os.path.join(out_dir, task)
    os.makedirs(folder, exist_ok=True)
    for split, lines in splits.items():
      lines = [lines[j] for j in rng.permutation(len(lines))]
      header = headers[task]
      with open(os.path.join(folder, f'{split}.tsv'), 'w', encoding='utf-8') as f:
        f.write(''.join(line + '\n' for line in header + lines))
      print(f'{folder}/{split}.tsv: {len(lines)} rows')


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python scripts/make_glue_sample.py OUT_DIR')
  write_tasks(sys.argv[1])
