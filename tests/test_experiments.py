"""experiments/reproduce.py end to end in its super-reduced mode (--smoke)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ('variant', 'fp_perplexity', 'max_inf_norm', 'avg_kurtosis', 'max_kurtosis',
          'w8a8_perplexity', 'w8a8_gap', 'bos_attention', 'no_op_mass')


@pytest.mark.slow
def test_reproduce_smoke_writes_every_variant(tmp_path):
  out = tmp_path / 'out'
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'reproduce.py'),
                      '--smoke', '--out', str(out), '--variants', 'vanilla,sink'],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.loads((out / 'results.json').read_text())
  assert [row['variant'] for row in rows] == ['vanilla', 'sink']
  for row in rows:
    for f in FIELDS:
      assert f in row, f
    assert row['fp_perplexity'] > 1 and row['w8a8_perplexity'] > 1
    assert row['w8a8_gap'] == pytest.approx(row['w8a8_perplexity'] - row['fp_perplexity'])
    att = row['attention']['bos_plain']
    assert len(att) == 1 and len(att[0]) == 2 and all(0 <= a <= 1 for a in att[0])
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
