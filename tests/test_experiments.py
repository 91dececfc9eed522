"""experiments/reproduce.py end to end in its super-reduced mode (--smoke)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ('variant', 'fp_perplexity', 'max_inf_norm', 'avg_kurtosis', 'max_kurtosis',
          'w8a8_perplexity', 'w8a8_gap', 'bos_attention', 'no_op_mass', 'self_attention')


@pytest.mark.slow
def test_reproduce_smoke_writes_every_variant(tmp_path):
  out = tmp_path / 'out'
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'reproduce.py'),
                      '--smoke', '--out', str(out), '--variants', 'vanilla,sink',
                      '--set', 'learning_rate=0.002'],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.loads((out / 'results.json').read_text())
  assert [row['variant'] for row in rows] == ['vanilla', 'sink']
  for row in rows:
    for f in FIELDS:
      assert f in row, f
    assert row['fp_perplexity'] > 1 and row['w8a8_perplexity'] > 1
    assert row['w8a8_gap'] == pytest.approx(row['w8a8_perplexity'] - row['fp_perplexity'])
    assert row['config']['learning_rate'] == 0.002
    att = row['attention']['bos_plain']
    assert len(att) == 1 and len(att[0]) == 2 and all(0 <= a <= 1 for a in att[0])
    for a, s_, n_ in zip(att[0], row['attention']['self_plain'][0],
                         row['attention']['nothing_plain'][0]):
      assert 0 <= s_ <= 1 and a + s_ + n_ <= 1 + 1e-5     # BOS and self are distinct keys
  # softmax1 / sink rows leave mass on "nothing"; vanilla rows sum to one.
  assert max(abs(v) for v in rows[0]['attention']['nothing_plain'][0]) < 1e-5
  assert min(rows[1]['attention']['nothing_plain'][0]) > 0
  md = (out / 'results.md').read_text()
  assert '| vanilla |' in md and '| learned sink logit |' in md and 'W8A8 gap' in md
  for png in ('per_layer.png', 'attention.png'):
    assert (out / png).stat().st_size > 1000


def test_unknown_variant_is_an_error():
  sys.path.insert(0, ROOT)
  from experiments import reproduce
  with pytest.raises(SystemExit, match='unknown variant'):
    reproduce.build_config('nope', 'smoke')


def test_set_overrides_fields_and_rejects_unknown_ones():
  sys.path.insert(0, ROOT)
  from experiments import reproduce
  ov = {'set': dict(map(reproduce.parse_setting, ['model.num_layers=1',
                                                   'data.synthetic.trigger_prob=0.3',
                                                   'lr_schedule=linear']))}
  c = reproduce.build_config('vanilla', 'quick', ov)
  assert (c.model.num_layers, c.data.synthetic.trigger_prob, c.lr_schedule) == (1, 0.3, 'linear')
  with pytest.raises(SystemExit, match='no field .num_layer.'):
    reproduce.build_config('vanilla', 'quick', {'set': {'model.num_layer': 1}})
  with pytest.raises(SystemExit, match='expected KEY=VALUE'):
    reproduce.parse_setting('learning_rate')
