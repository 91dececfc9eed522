"""The synthetic Bigram-Backcopy source: the task's rules, purity in (seed, step), the hooks."""
import numpy as np
import pytest

from configs import base
from oqt_jax import data
from oqt_jax.data import synthetic as S
from oqt_jax.errors import ConfigError


def _config(**kw):
  c = base.get_config()
  c.model.model_type, c.model.max_position_embeddings, c.model.pad_token_id = 'opt', 64, 1
  c.data.source = 'synthetic'
  c.data.synthetic.seq_length = 48
  for k, v in kw.items():
    c.data.synthetic[k] = v
  return c


def test_sequences_follow_the_rules():
  c = _config()
  p = S.task_params(c.data)
  triggers, succ, _, plain = S._tables(p['vocab'], p['num_triggers'], p['branching'], p['seed'])
  x = S.generate(np.random.default_rng(0), 64, p)
  assert x.shape == (64, 48) and (x[:, 0] == S.BOS_ID).all()
  assert np.isin(x[:, 1], plain).all()
  copies = 0
  for t in range(1, 47):
    cur, nxt = x[:, t], x[:, t + 1]
    trig = np.isin(cur, triggers)
    np.testing.assert_array_equal(nxt[trig], x[trig, t - 1])          # back-copy
    copies += trig.sum()
    ok = np.array([n in succ[c - S.FIRST_CONTENT_ID] or n in triggers
                   for c, n in zip(cur[~trig], nxt[~trig])])
    assert ok.all()                                                    # bigram table (or a trigger)
  frac = copies / (64 * 46)
  assert 0.04 < frac < 0.2                                             # ~ trigger_prob
  m = S.copy_positions(x, c.data)
  assert m[:, 1:47].sum() == copies and not m[:, 0].any()


def test_batches_are_pure_in_seed_and_step_and_shard_by_process():
  c = _config()
  tok = data.get_tokenizer(c)
  assert (tok.bos_token_id, tok.pad_token_id, len(tok)) == (S.BOS_ID, S.PAD_ID, 64 + 4)
  ds = data.build_dataset(c, tok, 'train')
  a, b = ds.batch(5, 8), ds.batch(5, 8)
  np.testing.assert_array_equal(a['input_ids'], b['input_ids'])
  assert not np.array_equal(a['input_ids'], ds.batch(6, 8)['input_ids'])
  halves = [ds.batch(5, 4, process_index=i, process_count=2)['input_ids'] for i in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), a['input_ids'])
  np.testing.assert_array_equal(a['labels'], a['input_ids'])
  other = data.build_dataset(_config(seed=1), tok, 'train')               # another task
  assert not np.array_equal(other.batch(5, 8)['input_ids'], a['input_ids'])
  val = data.build_dataset(c, tok, 'validation')
  ev = list(val.eval_batches(512, 3))
  assert len(ev) == 2 and ev[0]['input_ids'].shape == (512, 48)
  assert (ev[1]['labels'][512 - (1024 - 512):] == -100).sum() == 0         # 1024 rows exactly


@pytest.mark.parametrize('kw,field', [(dict(vocab=2), 'vocab'), (dict(num_triggers=64), 'num_triggers'),
                                      (dict(trigger_prob=1.5), 'trigger_prob'),
                                      (dict(seq_length=100), 'seq_length')])
def test_bad_task_knobs_name_the_field(kw, field):
  with pytest.raises(ConfigError, match=rf'^data\.synthetic\.{field}='):
    data.validate_data_config(_config(**kw))


def test_synthetic_needs_a_causal_lm():
  c = _config()
  c.model.model_type = 'bert'
  with pytest.raises(ConfigError, match=r"^data\.source='synthetic'"):
    data.validate_data_config(c)
