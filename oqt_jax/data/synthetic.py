"""Synthetic "Bigram-Backcopy" sequences (`config.data.source='synthetic'`).

A small task on which even a one-layer transformer grows attention sinks and no-op heads
(Guo et al., ICLR 2025, "Active-dormant attention heads"): most tokens need no information
from the context, a few need exactly one earlier token.

Task (fixed by `data.synthetic.seed`, independent of the training seed):
  * vocabulary: the specials `<s>`=0 (BOS), `<pad>`=1, `</s>`=2, `<unk>`=3 (OPT's ids), then
    `vocab` content tokens `a0 .. a{vocab-1}` (ids 4 ..);
  * `num_triggers` of the content tokens are triggers;
  * a bigram table: every content token has `branching` possible successors among the
    non-trigger tokens, with Dirichlet(1) probabilities;
  * a sequence of `seq_length` tokens starts with BOS and a uniformly drawn non-trigger token;
    then, for t >= 1: if x_t is a trigger, x_{t+1} = x_{t-1} (back-copy, deterministic);
    otherwise with probability `trigger_prob` x_{t+1} is a uniformly drawn trigger, else it
    follows the bigram table of x_t.
Predicting the token after a trigger needs attention to the previous token; every other
prediction needs only the current token, so the attention heads have nothing to do there.

Batches (CLM: labels = input_ids, every row full length, no padding):
  training batch of step N = rows [p*B, (p+1)*B) of the global batch generated from
  numpy's default_rng((seed, 0, N)): a pure function of (seed, N, process);
  validation: `num_eval_examples` rows from default_rng((seed, 1)), in order.
"""
from __future__ import annotations

import functools
import numbers

import numpy as np

from oqt_jax.data import sampling
from oqt_jax.errors import ConfigError

SPECIAL_TOKENS = ('<s>', '<pad>', '</s>', '<unk>')
BOS_ID, PAD_ID = 0, 1
FIRST_CONTENT_ID = len(SPECIAL_TOKENS)
_TRAIN_STREAM, _EVAL_STREAM = 0, 1

# (field, minimum, default); configs/base.py data_defaults() holds the same defaults.
FIELDS = (('vocab', 4, 64), ('seq_length', 4, 128), ('num_triggers', 1, 3),
          ('branching', 1, 4), ('seed', 0, 0), ('num_eval_examples', 1, 1024))
DEFAULT_TRIGGER_PROB = 0.1


def _field(s, name, low, default):
  v = s.get(name, default) if hasattr(s, 'get') else getattr(s, name, default)
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
    raise ConfigError(f'data.synthetic.{name}={v!r}: must be an integer >= {low}')
  return int(v)


def task_params(data_config) -> dict:
  """The validated task knobs of `data_config.synthetic` (ConfigError naming the field)."""
  s = data_config.get('synthetic', None) if hasattr(data_config, 'get') else None
  s = {} if s is None else s
  known = {f[0] for f in FIELDS} | {'trigger_prob'}
  unknown = sorted(set(s.keys()) - known)
  if unknown:
    raise ConfigError(f'data.synthetic.{unknown[0]}: unknown field (known: '
                      f'{", ".join(sorted(known))})')
  out = {name: _field(s, name, low, default) for name, low, default in FIELDS}
  p = s.get('trigger_prob', DEFAULT_TRIGGER_PROB)
  if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < p < 1.0:
    raise ConfigError(f'data.synthetic.trigger_prob={p!r}: must be in (0, 1)')
  out['trigger_prob'] = float(p)
  if out['num_triggers'] >= out['vocab']:
    raise ConfigError(f"data.synthetic.num_triggers={out['num_triggers']}: must be smaller "
                      f"than data.synthetic.vocab={out['vocab']}")
  if out['branching'] > out['vocab'] - out['num_triggers']:
    raise ConfigError(f"data.synthetic.branching={out['branching']}: at most vocab - "
                      f"num_triggers = {out['vocab'] - out['num_triggers']}")
  return out


@functools.lru_cache(maxsize=8)
def _tables(vocab: int, num_triggers: int, branching: int, seed: int):
  """(triggers (K,), successor ids (V, branching), successor cdf (V, branching)), in ids."""
  rng = np.random.default_rng((int(seed), 7))
  content = np.arange(vocab)
  triggers = np.sort(rng.choice(vocab, size=num_triggers, replace=False))
  plain = np.setdiff1d(content, triggers)
  succ = np.stack([rng.choice(plain, size=branching, replace=False) for _ in range(vocab)])
  probs = rng.dirichlet(np.ones(branching), size=vocab)
  cdf = np.cumsum(probs, axis=1)
  cdf[:, -1] = 1.0
  off = FIRST_CONTENT_ID
  return triggers + off, succ + off, cdf, plain + off


def generate(rng: np.random.Generator, n: int, p: dict) -> np.ndarray:
  """`n` sequences (n, seq_length) int32 of the task `p` (see the module docstring)."""
  triggers, succ, cdf, plain = _tables(p['vocab'], p['num_triggers'], p['branching'],
                                       p['seed'])
  t_len = p['seq_length']
  is_trig = np.zeros(p['vocab'] + FIRST_CONTENT_ID, bool)
  is_trig[triggers] = True
  x = np.empty((n, t_len), np.int32)
  x[:, 0] = BOS_ID
  x[:, 1] = rng.choice(plain, size=n)
  u_trig = rng.random((n, t_len))
  u_next = rng.random((n, t_len))
  trig_pick = rng.integers(0, len(triggers), (n, t_len))
  for t in range(1, t_len - 1):
    cur = x[:, t]
    c = cur - FIRST_CONTENT_ID
    k = (u_next[:, t, None] > cdf[c]).sum(axis=1)
    nxt = succ[c, np.minimum(k, succ.shape[1] - 1)]
    nxt = np.where(u_trig[:, t] < p['trigger_prob'], triggers[trig_pick[:, t]], nxt)
    x[:, t + 1] = np.where(is_trig[cur], x[:, t - 1], nxt)
  return x


def copy_positions(ids: np.ndarray, data_config) -> np.ndarray:
  """Bool (n, T): True at the positions whose next token is a back-copy (x_t a trigger)."""
  p = task_params(data_config)
  triggers = _tables(p['vocab'], p['num_triggers'], p['branching'], p['seed'])[0]
  m = np.isin(ids, triggers)
  m[:, 0] = False
  return m


def build_tokenizer(data_config):
  """A word-level fast tokenizer over the task's vocabulary (saved with HF exports)."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  p = task_params(data_config)
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  vocab.update({f'a{i}': FIRST_CONTENT_ID + i for i in range(p['vocab'])})
  core = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=core, bos_token='<s>', pad_token='<pad>',
                                 eos_token='</s>', unk_token='<unk>',
                                 model_max_length=p['seq_length'])


class SyntheticDataset(sampling.IndexedDataset):
  """Bigram-Backcopy CLM batches with the LMDataset interface (batch, eval_batches)."""

  kind = 'clm'

  def __init__(self, data_config, seed: int, tokenizer=None):
    self.params = task_params(data_config)
    self.data_config = data_config
    self.seed = int(seed)
    self.seq_len = self.params['seq_length']
    self.tokenizer = tokenizer
    self.num_examples = self.params['num_eval_examples']
    self.num_tokens = self.num_examples * self.seq_len
    self._eval = None

  def __len__(self) -> int:
    return self.num_examples

  @staticmethod
  def _rows(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {'input_ids': ids, 'attention_mask': np.ones_like(ids),
            'labels': ids.copy()}

  def batch(self, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    """Training batch at `step` (per-process `batch_size` rows); pure in (seed, step)."""
    sampling.global_positions(step, batch_size, process_index, process_count)  # checks
    rng = np.random.default_rng((self.seed, _TRAIN_STREAM, int(step)))
    ids = generate(rng, batch_size * process_count, self.params)
    return self._rows(ids[process_index * batch_size:(process_index + 1) * batch_size])

  def eval_examples(self) -> np.ndarray:
    if self._eval is None:
      rng = np.random.default_rng((self.seed, _EVAL_STREAM))
      self._eval = generate(rng, self.num_examples, self.params)
    return self._eval

  def _eval_rows(self, indices, valid) -> dict[str, np.ndarray]:
    out = self._rows(self.eval_examples()[np.asarray(indices)])
    out['labels'][~np.asarray(valid)] = -100
    return out
