"""Every documented command shape, end to end at tiny scale, offline: train; eval.py FP,
--quantize, AdaRound, --out, each config.quant.method, --prompt, --hf_model alone; QAT from
scratch and from an HF dir; GLUE FP / PTQ from an HF dir; experiments/*.py --smoke. Each
checks that its outputs exist and are finite. (Shapes run end to end elsewhere: eval.py
--compare in tests/test_compare.py; QAT continuing a workdir and QAT of an HF dir on a GLUE
task in tests/test_qat.py.) Then the bad input of these surfaces: one line `error: ...`
naming the field / file / method, exit 2.

eval.py runs in this process (its main(), absl flags re-parsed per case); train.py's work
through oqt_jax.train.train_and_evaluate (what its main() calls). One tiny trained OPT
workdir, one tiny BERT HF dir and one GLUE folder are shared by the module.
"""
import glob
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from oqt_jax import models
from oqt_jax.config import load_config_file
from oqt_jax.train import testing

ROOT = testing.REPO_ROOT
OPT_CFG = os.path.join(ROOT, 'configs', 'tiny_opt_vanilla.py')
BERT_CFG = os.path.join(ROOT, 'configs', 'tiny_bert_vanilla.py')
SST2_CFG = os.path.join(ROOT, 'configs', 'glue', 'sst2.py')
TINY = dict(testing.TINY_OVERRIDES, num_eval_batches=1, eval_every_steps=0, log_every_steps=2,
            checkpoint_every_steps=1000)
EVAL = ['--noprogress', '--num_batches=1', '--batch_size=4']


def _finite(x, where=''):
  """Every number in a (nested) metrics dict is finite."""
  if isinstance(x, dict):
    for k, v in x.items():
      _finite(v, f'{where}.{k}')
  elif isinstance(x, (list, tuple)):
    for i, v in enumerate(x):
      _finite(v, f'{where}[{i}]')
  elif isinstance(x, float):
    assert math.isfinite(x), where
  elif isinstance(x, str):
    assert x not in ('nan', 'inf', '-inf'), where


# ---------------------------------------------------------------- eval.py in this process
@pytest.fixture(scope='module')
def cli():
  """eval.py's main() with argv: (exit status, stdout, stderr)."""
  from absl import flags
  spec = importlib.util.spec_from_file_location('oqt_eval_cli', os.path.join(ROOT, 'eval.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)

  def reset():
    for name in [n for n in flags.FLAGS if n.startswith('config.')]:
      delattr(flags.FLAGS, name)     # config_flags defines these again at every parse
    flags.FLAGS.unparse_flags()

  def run(capfd, *args):
    reset()
    argv = ['eval.py', *args]
    saved, sys.argv = sys.argv, argv
    capfd.readouterr()
    try:
      mod.main(mod._parse_flags(argv))
      code = 0
    except SystemExit as e:
      code = e.code
    finally:
      sys.argv = saved
      reset()
    out, err = capfd.readouterr()
    return code, out, err
  return run


def _one_line_error(code, err, *needles):
  assert code == 2, err[-2000:]
  assert 'Traceback' not in err
  lines = [l for l in err.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error: ')]
  assert len(errors) == 1 and errors[0] == lines[-1], err[-2000:]
  for n in needles:
    assert n in errors[0], (n, errors[0])
  return errors[0]


def _train(config_file, workdir, **overrides):
  from oqt_jax.train.loop import train_and_evaluate
  return train_and_evaluate(load_config_file(config_file, dict(TINY, **overrides)), str(workdir),
                            progress=False)


# ---------------------------------------------------------------- shared tiny runs
@pytest.fixture(scope='module')
def opt_run(tmp_path_factory):
  """train.py --config configs/tiny_opt_vanilla.py --workdir W (4 steps)."""
  w = tmp_path_factory.mktemp('opt') / 'run'
  _train(OPT_CFG, w, num_train_steps=4)
  return w


@pytest.fixture(scope='module')
def bert_hf(tmp_path_factory):
  """An HF BertForMaskedLM dir (random tiny weights) with a tokenizer trained on the corpus."""
  from oqt_jax.data import sources
  from oqt_jax.data.tokenizer import train_tokenizer
  from oqt_jax.models import hf
  d = tmp_path_factory.mktemp('bert_hf')
  texts = sources.load_texts(load_config_file(BERT_CFG).data, 'train')
  tok = train_tokenizer(sources.iter_lines(texts[:300]), 'bert_bpe', 256, 64)
  cfg = models.ModelConfig(model_type='bert', head='mlm', vocab_size=len(tok), hidden_size=32,
                           num_layers=2, num_heads=2, intermediate_size=64,
                           max_position_embeddings=64)
  model = models.build(cfg)
  hf.save(model, models.init_variables(model, jax.random.PRNGKey(0)), str(d), tokenizer=tok)
  return d


@pytest.fixture(scope='module')
def glue_dir(tmp_path_factory):
  """An SST-2-format folder (train.tsv / dev.tsv)."""
  d = tmp_path_factory.mktemp('sst2')
  words = ['good', 'bad', 'fine', 'awful', 'great', 'poor']
  for name, n in (('train.tsv', 48), ('dev.tsv', 16)):
    rows = [f'the {words[i % 6]} film number {i}\t{(i % 6) % 2 == 0:d}' for i in range(n)]
    (d / name).write_text('sentence\tlabel\n' + '\n'.join(rows) + '\n')
  return d


@pytest.fixture(scope='module')
def rte_dir(tmp_path_factory):
  """A learnable RTE-format task: the hypothesis restates the premise (entailment) or
  negates it with 'not' (not_entailment); 64 train, 24 dev rows."""
  d = tmp_path_factory.mktemp('rte')
  rng = np.random.default_rng(0)
  subj = ['the cat', 'the dog', 'a bird', 'he', 'she', 'they']
  verb = ['sat on the mat', 'ran', 'sees the house', 'likes the car', 'is big', 'is small']
  for name, n in (('train.tsv', 64), ('dev.tsv', 24)):
    lines = ['index\tsentence1\tsentence2\tlabel']
    for i in range(n):
      s, v = subj[rng.integers(6)], verb[rng.integers(6)]
      if i % 2 == 0:
        lines.append(f'{i}\t{s} {v} and it is good\t{s} {v}\tentailment')
      else:
        lines.append(f'{i}\t{s} {v}\t{s} not {verb[rng.integers(6)]}\tnot_entailment')
    (d / name).write_text('\n'.join(lines) + '\n')
  return d


RTE_CFG = os.path.join(ROOT, 'configs', 'glue', 'rte.py')
GLUE = ['--config.data.max_seq_length=32', '--config.eval_batch_size=8']


def _glue_overrides(bert_hf, glue_dir, **kw):
  return dict({'init_from': str(bert_hf), 'data.files': str(glue_dir),
               'data.max_seq_length': 32, 'per_device_batch_size': 8, 'num_train_epochs': -1.0,
               'num_train_steps': 3, 'warmup_ratio': -1.0, 'model.hidden_size': 32}, **kw)


# ---------------------------------------------------------------- the workflow matrix
METHOD_ARGS = {   # keep each method's own work tiny
    'outlier_suppression': ['--config.quant.twc_fine=False'],
    'adaround': ['--config.quant.adaround_iters=2', '--config.quant.adaround_samples=4'],
    'w8a8_mse': ['--config.quant.num_candidates=10'],
}


# The methods whose eval.py path differs (no calibration: fp, llm_int8; the weight-only branch;
# a preset that changes the setup and granularity: smoothquant). Every registered method runs
# through eval.py in test_compare.py (--compare) and is resolved and checked on a model in
# test_door.py.
WORKFLOW_METHODS = ('fp', 'llm_int8', 'weight_only', 'smoothquant')


def _eval_cases():
  cases = [
      ('fp', [], 'fp'),
      ('quantize', ['--quantize', '--config.quant.est_num_batches=1'], 'w8a8'),
      ('adaround', ['--quantize', '--config.quant.n_bits=4', '--config.quant.adaround=True',
                    '--config.quant.adaround_iters=2', '--config.quant.adaround_samples=4',
                    '--config.quant.est_num_batches=1'], 'w4a8_adaround'),
      ('out_name', ['--quantize', '--config.quant.est_num_batches=1', '--out', 'mine'], 'mine'),
  ]
  for name in WORKFLOW_METHODS:
    cases.append((f'method={name}', [f'--config.quant.method={name}',
                                     '--config.quant.est_num_batches=1',
                                     *METHOD_ARGS.get(name, [])], None))
  return cases


@pytest.mark.parametrize('args,name', [c[1:] for c in _eval_cases()],
                         ids=[c[0] for c in _eval_cases()])
def test_eval_workflow(cli, capfd, opt_run, args, name):
  """eval.py --config configs/tiny_opt_vanilla.py --workdir W [shape]: the named files,
  finite metrics, a titled table; evaluations of one workdir do not overwrite each other."""
  before = set(os.listdir(opt_run))
  code, out, err = cli(capfd, '--config', OPT_CFG, '--workdir', str(opt_run), *EVAL, *args)
  assert code == 0, err[-3000:]
  new = sorted(set(os.listdir(opt_run)) - before)
  m = json.loads((opt_run / 'eval_metrics.json').read_text())
  name = name or m['name']
  assert m['name'] == name and f'eval_{name}.json' in os.listdir(opt_run), new
  assert json.loads((opt_run / f'eval_{name}.json').read_text()) == m
  for png in (f'eval_{name}_per_layer.png', f'eval_{name}_histogram.png'):
    assert (opt_run / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', png
  _finite({k: v for k, v in m.items() if k != 'plots'})
  # The trained model is what eval.py evaluated: same tokens, perplexity of the same order.
  from oqt_jax.train import metrics
  trained = metrics.read_metrics(str(opt_run), kind='eval')[4]['eval_perplexity']
  assert 1 < m['perplexity'] < 2 * trained
  assert len(m['per_layer']) == 2 and 'layer_output' in m['per_layer'][0]
  assert 'FP: per-layer inf norm and kurtosis (opt)' in out and 'nan' not in out
  if '--quantize' in args or any('method=' in a for a in args):
    q = m['quantized']
    assert 0.9 * m['perplexity'] <= q['perplexity'] < 3 * m['perplexity']
    for key in ('max_inf_norm', 'avg_kurtosis', 'max_kurtosis', 'per_layer'):
      assert key in q
    assert 'quantized perplexity' in out and 'per-layer inf norm and kurtosis (opt)' in out
    assert '1 batches' not in err
  from oqt_jax.evaluate.run import NO_CALIBRATION
  if any(a == f'--config.quant.method={n}' for n in NO_CALIBRATION for a in args):
    assert 'calibrating' not in err and 'no calibration' in err   # nothing is calibrated
  if name == 'w8a8':
    assert m['quantized']['quant_config']['n_bits'] == 8
    assert 'calibrating on 1 batch (' in err
  for noise in ('PyTorch was not found', 'Traceback', 'WARNING'):
    assert noise not in err, err[-2000:]


def test_prompt_workflow(cli, capfd, opt_run):
  """eval.py ... --prompt TEXT: the prompt, its continuation (the greedy one the library
  gives with the run's tokenizer) and why it stopped; --seed makes sampling repeatable;
  lengths beyond the position table are refused before any announcement."""
  from oqt_jax.data.tokenizer import _load_dir
  from oqt_jax.evaluate import setup
  code, out, err = cli(capfd, '--config', OPT_CFG, '--workdir', str(opt_run), '--noprogress',
                       '--prompt', 'the history of', '--max_new_tokens=5')
  assert code == 0, err[-3000:]
  lines = out.splitlines()
  assert lines[-3] == 'prompt:       the history of'
  assert lines[-1].startswith('stopped:      ') and ('end-of-sequence' in lines[-1]
                                                      or '5 new tokens' in lines[-1])
  model, variables, _ = setup.load_model(load_config_file(OPT_CFG), str(opt_run))
  tok = _load_dir(str(opt_run / 'hf'), 'hf')
  ids = tok('the history of')['input_ids']
  new = np.asarray(models.generate(model, variables, np.asarray([ids]), 5,
                                   eos_token_id=tok.eos_token_id))[0, len(ids):].tolist()
  if tok.eos_token_id in new:
    new = new[:new.index(tok.eos_token_id)]
  assert lines[-2] == 'continuation: ' + tok.decode(new, skip_special_tokens=True)
  sampled = [cli(capfd, '--workdir', str(opt_run), '--noprogress', '--prompt', 'the',
                 '--max_new_tokens=6', '--temperature=1.0', f'--seed={s}')[1] for s in (3, 3)]
  assert sampled[0] == sampled[1]
  code, out, err = cli(capfd, '--workdir', str(opt_run), '--prompt', 'the history of',
                       '--max_new_tokens=500')
  _one_line_error(code, err, 'max_new_tokens=500', 'position table', 'at most')
  assert 'generating' not in err


def test_hf_model_alone(cli, capfd, bert_hf, tmp_path):
  """eval.py --hf_model DIR, nothing else: the model config and tokenizer from the dir, the
  embedded corpus, results written beside the checkpoint; --quantize too."""
  d = tmp_path / 'hf'
  shutil.copytree(bert_hf, d)
  code, out, err = cli(capfd, '--hf_model', str(d), *EVAL)
  assert code == 0, err[-3000:]
  m = json.loads((d / 'eval_fp.json').read_text())
  _finite({k: v for k, v in m.items() if k != 'plots'})
  assert m['model_type'] == 'bert' and m['perplexity'] > 1
  assert 'ffn+res kurt' in out and 'nan' not in out    # '-': the residual sum has no kurtosis
  assert 'PyTorch was not found' not in err and 'WARNING' not in err
  # --quantize, with a config of the other model type: a note, the model from the checkpoint.
  code, out, err = cli(capfd, '--hf_model', str(d), '--config', OPT_CFG, *EVAL, '--quantize',
                       '--config.quant.est_num_batches=1')
  assert code == 0, err[-3000:]
  assert (d / 'eval_w8a8.json').exists() and (d / 'eval_fp.json').exists()
  assert 'calibrating on 1 batch (' in err and 'note: the config is for opt models' in err
  q = json.loads((d / 'eval_w8a8.json').read_text())
  assert q['model_type'] == 'bert' and q['quantized']['quant_config']['n_bits'] == 8
  assert len(q['per_layer']) == 2 and 'ffn_output' in q['per_layer'][0]


def _qat_eval(cli, capfd, workdir, config_file, *extra):
  code, out, err = cli(capfd, '--config', config_file, '--workdir', str(workdir), *EVAL,
                       '--quantize', *extra)
  assert code == 0, err[-3000:]
  assert 'using the quantizers learned by QAT' in err
  m = json.loads((workdir / 'eval_metrics.json').read_text())
  assert m['name'].startswith('qat_w4a8')
  _finite({k: v for k, v in m.items() if k != 'plots'})
  return m


QAT = {'quant.qat': True, 'quant.n_bits': 4, 'quant.learn_ranges': 'minmax',
       'quant.est_num_batches': 1}


@pytest.mark.parametrize('start', ['scratch', 'hf_dir'])
def test_qat_workflow(cli, capfd, opt_run, bert_hf, tmp_path, start):
  """train.py ... --config.quant.qat=True from scratch and from an HF dir with an LM head
  (config.init_from); eval.py --quantize evaluates the learned quantizers. (QAT continuing a
  workdir, and QAT of an HF dir on a GLUE task: tests/test_qat.py.)"""
  w = tmp_path / 'qat'
  if start == 'scratch':
    testing.seed_workdir(str(opt_run), str(w))
    _train(OPT_CFG, w, num_train_steps=2, **{'model.num_layers': 1}, **QAT)
  else:
    _train(BERT_CFG, w, num_train_steps=2, init_from=str(bert_hf),
           **{'data.max_seq_length': 32, 'model.max_position_embeddings': 64}, **QAT)
  assert (w / 'hf' / 'config.json').exists()
  _qat_eval(cli, capfd, w, BERT_CFG if start == 'hf_dir' else OPT_CFG,
            *(['--config.data.max_seq_length=32'] if start == 'hf_dir' else []))


@pytest.mark.parametrize('mode', ['fp'])   # QAT of an HF dir on a GLUE task: tests/test_qat.py
def test_glue_from_hf_dir(cli, capfd, caplog, bert_hf, rte_dir, tmp_path, mode):
  """train.py --config configs/glue/rte.py --config.init_from=HF_DIR --config.data.files=DIR
  (4 epochs) [--config.quant.qat=True --config.quant.n_bits=4 ...]; eval.py --quantize on the
  run (FP + W8A8 PTQ, or the learned quantizers): GLUE accuracy of the FP and the quantized
  model; eval.py takes data.files from the run's config.json (not given here)."""
  w = tmp_path / 'rte'
  over = {'init_from': str(bert_hf), 'data.files': str(rte_dir), 'data.max_seq_length': 32,
          'eval_batch_size': 8, 'learning_rate': 3e-3, 'model.hidden_size': 32}
  if mode == 'fp':
    over.update({'num_train_epochs': 4.0})
  else:
    over.update(QAT, num_train_epochs=-1.0, num_train_steps=3)
  with caplog.at_level('INFO'):
    _train(RTE_CFG, w, **over)
  dropped = [r for r in caplog.records if 'checkpoint tensors not used' in r.getMessage()]
  assert dropped and all(r.levelname == 'INFO' for r in dropped)   # the MLM head: expected
  cfg = json.loads((w / 'config.json').read_text())
  assert cfg['model']['head'] == 'cls'
  evals = [json.loads(l) for l in (w / 'metrics.jsonl').read_text().splitlines()
           if '"kind": "eval"' in l]
  assert evals and evals[-1]['glue_task'] == 'rte'
  code, out, err = cli(capfd, '--config', RTE_CFG, '--workdir', str(w), *GLUE, '--noprogress',
                       '--noplots', '--quantize')
  assert code == 0, err[-3000:]
  assert 'validation rte: accuracy' in out
  m = json.loads((w / 'eval_metrics.json').read_text())
  _finite({k: v for k, v in m.items() if k != 'plots'})
  fp, q = m['glue'], m['quantized']['glue']
  assert fp['num_examples'] == q['num_examples'] == 24
  assert fp['accuracy'] == pytest.approx(evals[-1]['glue_accuracy'])
  assert 0.0 <= q['accuracy'] <= 1.0 and q['metric'] == q['accuracy']
  assert 'perplexity' not in out                       # a classifier: no perplexity
  assert 'WARNING' not in err and 'not used' not in err
  if mode == 'fp':
    assert cfg['num_train_steps'] == 4 * 64 // 8
    assert fp['accuracy'] >= 0.8, fp           # the task is learnable: 'not' decides it
    assert m['quantized']['quant_config']['ranges_weights'] == 'mse'
  else:
    assert 'using the quantizers learned by QAT' in err


# Scripts whose --smoke run is asserted end to end by their own module (same command, more
# checks): run once, there.
SMOKE_ELSEWHERE = {'compare_methods.py': 'test_compare.py', 'convert.py': 'test_convert.py'}


def _experiment_scripts():
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, 'experiments', '*.py'))):
    if os.path.basename(path).startswith('_') or os.path.basename(path) in SMOKE_ELSEWHERE:
      continue
    if '--smoke' in open(path).read():
      out.append(os.path.basename(path))
  return out


SMOKE_ARGS = {'reproduce.py': ['--variants', 'vanilla,sink', '--set', 'learning_rate=0.002']}


@pytest.mark.slow
@pytest.mark.parametrize('script', _experiment_scripts())
def test_experiment_smoke(tmp_path, script):
  """experiments/NAME.py --smoke --out DIR: exit 0, every number it writes finite."""
  out = tmp_path / 'out'
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', script), '--smoke',
                      '--out', str(out), *SMOKE_ARGS.get(script, [])],
                     capture_output=True, text=True, timeout=600,
                     env=testing.subprocess_env(fast_compile=True))
  assert r.returncode == 0, r.stderr[-3000:]
  written = [p for p in out.rglob('*') if p.is_file()]
  assert written, 'no output'
  for p in written:
    if p.suffix == '.json':
      _finite(json.loads(p.read_text()), str(p))
    elif p.suffix == '.png':
      assert p.stat().st_size > 1000
  if script == 'reproduce.py':
    rows = json.loads((out / 'results.json').read_text())
    assert [row['variant'] for row in rows] == ['vanilla', 'sink']
    for row in rows:
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


# ---------------------------------------------------------------- bad input, one line each
@pytest.fixture(scope='module')
def odd_checkpoints(tmp_path_factory, bert_hf):
  """HF dirs that cannot be evaluated: an architecture oqt_jax does not implement, a
  tokenizer of only special tokens, a tokenizer larger than the embedding table."""
  from tokenizers import Tokenizer, models as tmodels
  from transformers import PreTrainedTokenizerFast
  from oqt_jax.data.tokenizer import _load_dir
  from oqt_jax.models import hf
  root = tmp_path_factory.mktemp('odd')
  gpt2 = root / 'gpt2'
  gpt2.mkdir()
  (gpt2 / 'config.json').write_text(json.dumps({'model_type': 'gpt2', 'architectures':
                                                ['GPT2LMHeadModel'], 'vocab_size': 50}))
  special = root / 'special_only'
  shutil.copytree(bert_hf, special)
  for f in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt'):
    if (special / f).exists():
      (special / f).unlink()
  vocab = {t: i for i, t in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'])}
  PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tmodels.WordLevel(vocab, '[UNK]')),
                          pad_token='[PAD]', unk_token='[UNK]', cls_token='[CLS]',
                          sep_token='[SEP]', mask_token='[MASK]').save_pretrained(str(special))
  small = root / 'small_table'
  cfg = models.ModelConfig(model_type='bert', head='mlm', vocab_size=100, hidden_size=32,
                           num_layers=1, num_heads=2, intermediate_size=64,
                           max_position_embeddings=64)
  model = models.build(cfg)
  hf.save(model, models.init_variables(model, jax.random.PRNGKey(0)), str(small),
          tokenizer=_load_dir(str(bert_hf), 'hf'))
  return {'gpt2': gpt2, 'special_only': special, 'small_table': small}


def _eval_files(d):
  return sorted(p.name for p in d.iterdir() if p.name.startswith('eval_'))


@pytest.mark.parametrize('args,needles', [
    (['--config.quant.method=smoothqunt'], ['quant.method', "'smoothqunt'", 'smoothquant']),
    (['--quantize', '--config.quant.n_bits=1'], ['quant.n_bits=1', '2..16']),
    (['--quantize', '--config.quant.int8=True', '--config.quant.n_bits=12'],
     ['quant.int8', 'n_bits <= 8']),
    (['--quantize', '--config.quant.adaround=True', '--config.quant.adaround_iters=0'],
     ['quant.adaround_iters=0', '> 0']),
    (['--config.quant.n_bits=4'], ['--config.quant.n_bits', '--quantize']),
    (['--quantize', '--out', '../x'], ['--out=']),
    (['--config.data.tokenizer=/nonexistent/tok'], ["data.tokenizer='/nonexistent/tok'",
                                                   'no such directory']),
    (['--config.data.tokenizer=someone/missing-tokenizer'],
     ['someone/missing-tokenizer', 'not a local directory', 'offline']),
    (['--quantize', "--config.quant.quant_dict={'Q': 8}"], ["quant.quant_dict: unknown point 'Q'"]),
], ids=['unknown_method', 'bits', 'int8_bits', 'adaround_0', 'quant_without_quantize',
        'out_name', 'tokenizer_path', 'tokenizer_offline', 'quant_point'])
def test_eval_bad_input(cli, capfd, opt_run, monkeypatch, args, needles):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  before = _eval_files(opt_run)
  code, _, err = cli(capfd, '--config', OPT_CFG, '--workdir', str(opt_run), *EVAL, *args)
  _one_line_error(code, err, *needles)
  assert _eval_files(opt_run) == before                  # nothing written


def test_checkpoint_bad_input(cli, capfd, monkeypatch, odd_checkpoints, bert_hf, tmp_path):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  out = ['--workdir', str(tmp_path / 'out')]
  code, _, err = cli(capfd, '--config', OPT_CFG, '--workdir', str(tmp_path / 'empty'), *EVAL)
  _one_line_error(code, err, 'no checkpoint')
  code, _, err = cli(capfd, '--hf_model', str(tmp_path / 'no' / 'such'), *EVAL)
  _one_line_error(code, err, '--hf_model=', 'no such directory')
  code, _, err = cli(capfd, '--hf_model', 'someone/missing-model', *out, *EVAL)
  _one_line_error(code, err, 'someone/missing-model', 'not in the hub cache')
  code, _, err = cli(capfd, '--hf_model', str(odd_checkpoints['gpt2']), *out, *EVAL)
  _one_line_error(code, err, str(odd_checkpoints['gpt2'] / 'config.json'), "'gpt2'",
                  'GPT2LMHeadModel', 'not implemented', 'BertForMaskedLM')
  code, _, err = cli(capfd, '--hf_model', str(odd_checkpoints['special_only']), *out, *EVAL)
  _one_line_error(code, err, 'only special tokens')
  code, _, err = cli(capfd, '--hf_model', str(odd_checkpoints['small_table']), *out, *EVAL)
  _one_line_error(code, err, 'embedding table', 'does not belong')
  code, _, err = cli(capfd, '--hf_model', str(bert_hf), *out, '--prompt', 'the history')
  _one_line_error(code, err, '--prompt', 'OPT causal-LM', 'bert')
  assert not (tmp_path / 'out').exists() or not _eval_files(tmp_path / 'out')
  code, out_text, _ = cli(capfd, '--help')
  assert code == 0 and 'python eval.py --hf_model' in out_text and '--out:' in out_text


def test_training_bad_input(opt_run, bert_hf, glue_dir, tmp_path):
  """train.py's errors of the new surfaces (raised as ConfigError / DataError /
  CheckpointError, which train.py prints as one line `error: ...`, exit 2), before any
  checkpoint is written."""
  from oqt_jax.errors import CheckpointError, ConfigError, DataError
  no_dev = tmp_path / 'no_dev'
  no_dev.mkdir()
  shutil.copy(glue_dir / 'train.tsv', no_dev / 'train.tsv')
  bad_label = tmp_path / 'bad_label'
  shutil.copytree(glue_dir, bad_label)
  lines = (bad_label / 'train.tsv').read_text().splitlines()
  lines[5] = 'a sentence with a bad label\t7'
  (bad_label / 'train.tsv').write_text('\n'.join(lines) + '\n')
  cases = [
      ({'data.files': str(no_dev)}, (DataError, ConfigError), [str(no_dev / 'dev.tsv')]),
      ({'data.files': str(bad_label)}, DataError,
       [str(bad_label / 'train.tsv'), 'line 6', "label 7", 'label set']),
      ({'init_from': str(tmp_path / 'missing')}, (CheckpointError, ConfigError),
       ['init_from', 'missing']),
      ({'init_from': str(opt_run)}, (CheckpointError, ConfigError),
       ['an OPT checkpoint', "'cls' head", 'BERT']),
  ]
  for i, (over, exc, needles) in enumerate(cases):
    w = tmp_path / f'run{i}'
    with pytest.raises(exc) as e:
      _train(SST2_CFG, w, **_glue_overrides(bert_hf, glue_dir, **over))
    msg = str(e.value)
    assert '\n' not in msg.strip(), msg
    for n in needles:
      assert n in msg, (n, msg)
    assert not (w / 'checkpoints').exists() or not os.listdir(w / 'checkpoints')


# ---------------------------------------------------------------- units of these workflows
def test_load_model_prefers_newest_and_reads_orbax(tmp_path):
  import ml_collections
  import orbax.checkpoint as ocp
  from configs import base
  from oqt_jax.errors import CheckpointError
  from oqt_jax.evaluate import setup
  from oqt_jax.models import hf
  cfg = models.ModelConfig(model_type='opt', vocab_size=2048, hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=64, max_position_embeddings=64,
                           activation='relu', pad_token_id=1)
  model = models.build(cfg)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  config = base.get_config()
  config.model = ml_collections.ConfigDict(
      {k: getattr(model.cfg, k) for k in models.ModelConfig.__dataclass_fields__})
  with pytest.raises(CheckpointError, match='no checkpoint'):
    setup.load_model(config, str(tmp_path))
  with open(tmp_path / 'config.json', 'w') as fh:
    fh.write(config.to_json_best_effort())
  mngr = ocp.CheckpointManager(str(tmp_path / 'checkpoints'))
  mngr.save(7, args=ocp.args.StandardSave({'step': np.int32(7), 'params': variables['params'],
                                           'opt_state': {}, 'rng': np.zeros(2, np.uint32)}))
  mngr.wait_until_finished()
  mngr.close()
  loaded, lvars, src = setup.load_model(config, str(tmp_path))
  assert src.endswith(os.path.join('checkpoints', '7')) and loaded.cfg == model.cfg
  same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                lvars['params'], variables['params'])
  assert all(jax.tree_util.tree_leaves(same))
  # A newer HF export wins over an older Orbax step.
  hf.save(model, variables, str(tmp_path / 'hf'))
  assert setup.load_model(config, str(tmp_path))[2] == str(tmp_path / 'hf')


def test_eval_config_takes_the_runs_data_settings(tmp_path):
  """eval.py on a workdir: the data settings recorded in WORKDIR/config.json win over the
  config file's unless given on the command line; no --config: the recorded config; an HF
  dir's tokenizer unless data.tokenizer is explicit."""
  from oqt_jax.evaluate import setup
  cfg = load_config_file(SST2_CFG)
  rec = cfg.copy_and_resolve_references()
  rec.data.files, rec.data.max_seq_length, rec.eval_batch_size = '/data/sst2', 64, 3
  (tmp_path / 'config.json').write_text(rec.to_json_best_effort())
  got = setup.eval_config(cfg, str(tmp_path))
  assert (got.data.files, got.data.max_seq_length) == ('/data/sst2', 64)
  assert got.eval_batch_size == cfg.eval_batch_size           # not a data setting
  mine = load_config_file(SST2_CFG, {'data.files': '/elsewhere'})
  assert setup.eval_config(mine, str(tmp_path), explicit=['data.files']).data.files == '/elsewhere'
  alone = setup.eval_config(None, str(tmp_path))
  assert alone.data.files == '/data/sst2' and alone.data.glue_task == 'sst2'
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / 'tokenizer.json').write_text('{}')
  (tmp_path / 'hf' / 'config.json').write_text('{"model_type": "opt", '
                                               '"max_position_embeddings": 40}')
  h = setup.eval_config(None, None, str(tmp_path / 'hf'))
  assert h.data.tokenizer == str(tmp_path / 'hf') and h.data.source == 'embedded'
  assert h.model.model_type == 'opt' and h.data.block_size == 40
  assert setup.eval_config(cfg, None, str(tmp_path / 'hf'),
                         explicit=['data.tokenizer']).data.tokenizer == cfg.data.tokenizer


def test_experiments_reproduce_settings():
  sys.path.insert(0, ROOT)
  from experiments import reproduce
  with pytest.raises(SystemExit, match='unknown variant'):
    reproduce.build_config('nope', 'smoke')
  ov = {'set': dict(map(reproduce.parse_setting, ['model.num_layers=1',
                                                   'data.synthetic.trigger_prob=0.3',
                                                   'lr_schedule=linear']))}
  c = reproduce.build_config('vanilla', 'quick', ov)
  assert (c.model.num_layers, c.data.synthetic.trigger_prob, c.lr_schedule) == (1, 0.3, 'linear')
  with pytest.raises(SystemExit, match='no field .num_layer.'):
    reproduce.build_config('vanilla', 'quick', {'set': {'model.num_layer': 1}})
  with pytest.raises(SystemExit, match='expected KEY=VALUE'):
    reproduce.parse_setting('learning_rate')
