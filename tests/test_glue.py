"""GLUE fine-tuning: metrics (vs scikit-learn / scipy and hand-computed cases), the GLUE TSV /
JSONL formats, init_from, epochs -> steps, the classification head's predictions against
PyTorch, and one end-to-end train.py + eval.py run (FP and PTQ) with no network."""
import json
import os

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from oqt_jax import data
from oqt_jax.data import glue as glue_data
from oqt_jax.errors import ConfigError, DataError
from oqt_jax.evaluate import glue as glue_eval
from oqt_jax.train import init_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('the a cat dog sat on mat ran is not big small red blue runs it he she they and or '
         'yes no good bad house car tree bird sees likes').split()


# --------------------------------------------------------------------------- metrics


def test_metrics_agree_with_sklearn_and_scipy():
  rng = np.random.default_rng(0)
  n = 200
  for task in ('cola', 'sst2', 'mrpc', 'qqp', 'mnli', 'qnli', 'rte', 'wnli'):
    c = glue_data.GLUE_TASKS[task].num_labels
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]    # better than chance
    pred = logits.argmax(-1)
    m = glue_eval.glue_metrics(task, logits, labels)
    assert m['accuracy'] == pytest.approx(skm.accuracy_score(labels, pred))
    if task in ('mrpc', 'qqp'):
      assert m['f1'] == pytest.approx(skm.f1_score(labels, pred))
      assert m['metric'] == pytest.approx((m['accuracy'] + m['f1']) / 2)
    if task == 'cola':
      assert m['matthews_correlation'] == pytest.approx(skm.matthews_corrcoef(labels, pred))
      assert m['metric'] == m['matthews_correlation']
    if task not in ('mrpc', 'qqp', 'cola'):
      assert m['metric'] == m['accuracy']
  y = rng.uniform(0, 5, n)
  p = y + rng.normal(0, 1.0, n)
  m = glue_eval.glue_metrics('stsb', p[:, None], y)
  assert m['pearson'] == pytest.approx(stats.pearsonr(p, y)[0])
  assert m['spearmanr'] == pytest.approx(stats.spearmanr(p, y)[0])
  assert m['metric'] == pytest.approx((m['pearson'] + m['spearmanr']) / 2)


def test_metrics_hand_computed():
  # MRPC: pred 1 1 0 0 1, label 1 0 0 1 1 (+ a filler row) -> TP 2, FP 1, FN 1, TN 1.
  m = glue_eval.glue_metrics('mrpc', np.array([1, 1, 0, 0, 1, 1]),
                             np.array([1, 0, 0, 1, 1, -100]))
  assert m['accuracy'] == pytest.approx(3 / 5)
  assert m['f1'] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
  # CoLA: TP 2, TN 1, FP 1, FN 0 -> MCC = (2*1 - 1*0) / sqrt(3 * 2 * 1 * 2).
  m = glue_eval.glue_metrics('cola', np.array([1, 1, 1, 0]), np.array([1, 1, 0, 0]))
  assert m['matthews_correlation'] == pytest.approx(2 / np.sqrt(12))
  # STS-B: x = 1 2 3, y = 1 3 2 -> Pearson 0.5 (centred: (-1,0,1) . (-1,1,0) = 1, norms 2);
  # ranks equal the values, so Spearman is 0.5 too.
  m = glue_eval.glue_metrics('stsb', np.array([1.0, 2.0, 3.0, 7.0]),
                             np.array([1.0, 3.0, 2.0, -100]))
  assert m['pearson'] == pytest.approx(0.5) and m['spearmanr'] == pytest.approx(0.5)
  # Undefined correlations (constant predictions) are 0, not NaN.
  m = glue_eval.glue_metrics('stsb', np.ones(4), np.array([1.0, 2.0, 3.0, 4.0]))
  assert m['pearson'] == 0.0 and m['spearmanr'] == 0.0
  assert glue_eval.glue_metrics('cola', np.ones(4, int), np.array([0, 1, 0, 1]))[
      'matthews_correlation'] == 0.0
  # The data package's name for it is the same function.
  assert data.glue_metrics('rte', np.array([0, 1]), np.array([0, 0]))['accuracy'] == 0.5


# --------------------------------------------------------------------------- local files


def _write(path, lines):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(''.join(line + '\n' for line in lines))


# One small file per task in the format of the GLUE distribution.
TSV_SAMPLES = {
    'cola': (None, ['gj04\t1\t\tthe cat sat .', 'gj04\t0\t*\tcat the "sat .']),
    'sst2': ('sentence\tlabel', ['a good film \t1', "it 's \"bad\t0"]),
    'mrpc': ('\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String',
             ['1\t11\t12\tthe cat sat\ta cat sat', '0\t13\t14\the ran\tshe sat']),
    'qqp': ('id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate',
            ['0\t1\t2\twhy is it red ?\twhy red ?\t1', '1\t3\t4\tbroken line',
             '2\t5\t6\twho ran ?\twhat is blue ?\t0']),
    'stsb': ('index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2'
             '\tscore', ['0\tmain\tf\t2012\t1\tnone\tnone\ta cat sat\tthe cat sat\t4.750',
                         '1\tmain\tf\t2012\t2\tnone\tnone\ta dog ran\ta bird\t0.5']),
    'mnli': ('index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse'
             '\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label',
             ['0\t1\t1e\tfiction\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tthe cat sat\ta cat sat'
              '\tentailment\tentailment',
              '1\t2\t2n\tfiction\t( a )\t( b )\t(ROOT a)\t(ROOT b)\the ran\tshe sat\tneutral'
              '\tneutral',
              '2\t3\t3c\tfiction\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tit is red\tit is blue'
              '\tcontradiction\tcontradiction']),
    'qnli': ('index\tquestion\tsentence\tlabel',
             ['0\twho sat ?\tthe cat sat .\tentailment', '1\twho ran ?\tit is red .'
              '\tnot_entailment']),
    'rte': ('index\tsentence1\tsentence2\tlabel',
            ['0\tthe cat sat on the mat\tthe cat sat\tentailment',
             '1\the ran\the sat\tnot_entailment']),
    'wnli': ('index\tsentence1\tsentence2\tlabel',
             ['0\tthe cat sat because it was tired\tthe cat was tired\t1',
              '1\the ran\tshe ran\t0']),
}
TSV_EXPECT = {   # (first sentence(s) of row 0, labels)
    'cola': (('the cat sat .',), [1, 0]),
    'sst2': (('a good film ',), [1, 0]),
    'mrpc': (('the cat sat', 'a cat sat'), [1, 0]),
    'qqp': (('why is it red ?', 'why red ?'), [1, 0]),
    'stsb': (('a cat sat', 'the cat sat'), [4.75, 0.5]),
    'mnli': (('the cat sat', 'a cat sat'), [0, 1, 2]),
    'qnli': (('who sat ?', 'the cat sat .'), [0, 1]),
    'rte': (('the cat sat on the mat', 'the cat sat'), [0, 1]),
    'wnli': (('the cat sat because it was tired', 'the cat was tired'), [1, 0]),
}


@pytest.mark.parametrize('task', sorted(TSV_SAMPLES))
def test_tsv_formats(tmp_path, task):
  header, rows = TSV_SAMPLES[task]
  _write(tmp_path / 'train.tsv', ([header] if header else []) + rows)
  cols = glue_data.read_glue_tsv(str(tmp_path / 'train.tsv'), task)
  info = data.glue_task_info(task)
  keys = [k for k in info.sentence_keys if k]
  assert set(cols) == set(keys) | {'label'}
  first, labels = TSV_EXPECT[task]
  assert tuple(cols[k][0] for k in keys) == first
  assert cols['label'] == pytest.approx(labels)
  if task == 'sst2':
    assert cols['sentence'][1] == "it 's \"bad"        # quotes kept as they are
  # Through the pipeline's reader: a datasets.Dataset with the hub's columns.
  c = _data_config(task, tmp_path)
  ds = glue_data.load_glue_split(c.data, 'train')
  assert ds.column_names == list(cols) and ds['label'] == pytest.approx(labels)


def test_mnli_dev_files_and_jsonl(tmp_path):
  header, rows = TSV_SAMPLES['mnli']
  _write(tmp_path / 'train.tsv', [header] + rows)
  _write(tmp_path / 'dev_matched.tsv', [header] + rows[:2])
  _write(tmp_path / 'dev_mismatched.jsonl',
         [json.dumps({'premise': 'a', 'hypothesis': 'b', 'label': 2, 'idx': 0})])
  c = _data_config('mnli', tmp_path)
  assert len(glue_data.load_glue_split(c.data, 'validation')) == 2      # = dev_matched.tsv
  with pytest.raises(DataError, match='dev_mismatched.tsv'):
    glue_data.load_glue_split(c.data, 'validation_mismatched')
  os.rename(tmp_path / 'dev_mismatched.jsonl', tmp_path / 'validation_mismatched.jsonl')
  ds = glue_data.load_glue_split(c.data, 'validation_mismatched')
  assert ds['premise'] == ['a'] and ds['label'] == [2]
  # JSONL with the hub's names; a missing field is named.
  _write(tmp_path / 'x.jsonl', [json.dumps({'sentence1': 'a', 'label': 1})])
  with pytest.raises(DataError, match="no field 'sentence2'"):
    glue_data.read_glue_jsonl(str(tmp_path / 'x.jsonl'), 'rte')


def test_local_file_errors(tmp_path):
  c = _data_config('rte', tmp_path)
  with pytest.raises(DataError, match=r'train\.tsv \(nor train\.jsonl\)') as e:
    glue_data.load_glue_split(c.data, 'train')
  assert '\n' not in str(e.value)
  _write(tmp_path / 'train.tsv', ['index\tsentence1\tsentence2\tlabel', '0\ta\tb\tmaybe'])
  with pytest.raises(DataError, match="line 2: label 'maybe'"):
    glue_data.load_glue_split(c.data, 'train')
  _write(tmp_path / 'train.tsv', ['index\tsentence1\tlabel', '0\ta\t1'])
  with pytest.raises(DataError, match="no column 'sentence2'"):
    glue_data.load_glue_split(c.data, 'train')
  c.data.files = str(tmp_path / 'nope')
  with pytest.raises(DataError, match='not a directory'):
    glue_data.load_glue_split(c.data, 'train')


def _data_config(task, folder):
  from configs.glue import common
  c = common.glue(task)
  c.data.files = str(folder)
  return c


def _sample_script():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'make_glue_sample', os.path.join(ROOT, 'scripts', 'make_glue_sample.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_sst2_sample_task(tmp_path):
  """scripts/make_glue_sample.py's SST-2-format probe: read by the pipeline's reader, labels =
  the word-count rule up to ~5% noise, dev split by sentence (no carrier sentence in both)."""
  mk = _sample_script()
  assert mk.sst2_label('a good day, a sad night, a nice walk') == 1
  assert mk.sst2_label('Poor, grim and GREAT.') == 0
  with pytest.raises(ValueError, match='tie'):
    mk.sst2_label('good or bad, poor')
  assert not set(mk.POSITIVE) & set(mk.NEGATIVE)
  mk.write_tasks(str(tmp_path))
  c = _data_config('sst2', tmp_path / 'sst2')
  dev, train = (glue_data.load_glue_split(c.data, s) for s in ('validation', 'train'))
  assert len(dev) >= 800 and len(train) > 3 * len(dev)
  sentiment = set(mk.POSITIVE) | set(mk.NEGATIVE)
  for ds in (dev, train):
    rule = np.array([mk.sst2_label(t) for t in ds['sentence']])
    labels = np.array(ds['label'])
    assert 0.02 < np.mean(rule != labels) < 0.09          # the label noise
    assert 0.4 < labels.mean() < 0.6
    n = [sum(w.strip('.,;:()"\'') in sentiment for w in t.lower().split())
         for t in ds['sentence']]
    assert min(n) == 1 and max(n) == 4

  def carriers(ds):     # the sentence without its inserted words
    return {' '.join(w for w in t.split() if w.lower() not in sentiment)
            for t in ds['sentence']}
  assert not carriers(dev) & carriers(train)


# --------------------------------------------------------------------------- tiny BERT


def _tiny_bert(path, arch='BertForMaskedLM', num_labels=2):
  import torch
  import transformers
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + list(WORDS)
  tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
  cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64, num_labels=num_labels)
  torch.manual_seed(0)
  model = getattr(transformers, arch)(cfg).eval()
  model.save_pretrained(str(path))
  tok.save_pretrained(str(path))
  return model, tok


def test_init_from_resolution_and_schedule(tmp_path):
  hf_dir = tmp_path / 'hf_model'
  hf_dir.mkdir()
  (hf_dir / 'config.json').write_text('{}')
  (hf_dir / 'vocab.txt').write_text('[PAD]\n')
  assert init_from.resolve(str(hf_dir)) == (str(hf_dir), str(hf_dir))
  work = tmp_path / 'run'
  (work / 'hf').mkdir(parents=True)
  (work / 'hf' / 'config.json').write_text('{}')
  (work / 'config.json').write_text('{}')          # the run's config, not an HF one
  (work / 'tokenizer').mkdir()
  (work / 'tokenizer' / 'tokenizer.json').write_text('{}')
  assert init_from.resolve(str(work)) == (str(work / 'hf'), str(work / 'tokenizer'))
  assert init_from.resolve('bert-base-uncased') == ('bert-base-uncased',) * 2
  with pytest.raises(ConfigError, match='init_from='):
    init_from.resolve(str(tmp_path / 'missing' / 'dir'))
  with pytest.raises(ConfigError, match='no config.json'):
    init_from.resolve(str(tmp_path))
  # Epochs -> steps: ceil(2.5 * ceil(100 / 32)) = 10; warmup 10% of that.
  from configs.glue import common
  c = common.glue('rte', num_epochs=2.5)
  c.warmup_ratio = 0.1
  r = init_from.resolve_schedule(c, 100, 32)
  assert (r.num_train_steps, r.warmup_steps) == (10, 1)
  assert init_from.resolve_schedule(common.glue('rte'), 2490, 8).num_train_steps == 3 * 312
  # Overrides: the task's head and labels, dropout, and non-default variant fields only.
  c = common.glue('stsb')
  c.model.gate, c.model.fine_tuning = 'conditional_per_token', True
  ov = init_from.load_overrides(c)
  assert ov['head'] == 'cls' and ov['num_labels'] == 1
  assert ov['gate'] == 'conditional_per_token' and ov['fine_tuning'] is True
  assert 'softmax' not in ov and ov['hidden_dropout'] == 0.1


def test_cls_predictions_match_torch(tmp_path):
  """evaluate_glue on an HF BertForSequenceClassification = the torch model's argmax."""
  import torch
  from oqt_jax.models import hf
  tmodel, tok = _tiny_bert(tmp_path / 'cls', 'BertForSequenceClassification', num_labels=3)
  folder = tmp_path / 'mnli'
  header, rows = TSV_SAMPLES['mnli']
  folder.mkdir()
  _write(folder / 'dev_matched.tsv', [header] + rows * 3)
  c = _data_config('mnli', folder)
  c.data.max_seq_length = 16
  c.data.tokenizer = str(tmp_path / 'cls')
  c.model.vocab_size, c.model.max_position_embeddings = len(tok), 64
  ds = data.build_dataset(c, data.get_tokenizer(c), 'validation')
  model, variables = hf.load(str(tmp_path / 'cls'))
  batches = list(ds.eval_batches(4))                    # 9 rows -> a filler-padded last batch
  m = glue_eval.evaluate_glue(model, variables, c, batches)
  b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
  with torch.no_grad():
    logits = tmodel(input_ids=torch.tensor(b['input_ids']).long(),
                    attention_mask=torch.tensor(b['attention_mask']).long(),
                    token_type_ids=torch.tensor(b['token_type_ids']).long()).logits.numpy()
  keep = b['labels'] != -100
  assert m['num_examples'] == 9 == keep.sum()
  assert m['accuracy'] == pytest.approx(skm.accuracy_score(b['labels'][keep],
                                                           logits[keep].argmax(-1)))
  jl, _ = glue_eval.predict(model, variables, batches)
  np.testing.assert_allclose(jl, logits, atol=1e-4)
  # eval.py's report: MNLI matched at the top level, mismatched under its split name.
  _write(folder / 'dev_mismatched.tsv', [header] + rows)
  rep = glue_eval.glue_report(model, variables, c, glue_eval.glue_datasets(c, None, ds), 4)
  assert rep['accuracy'] == m['accuracy'] and rep['num_examples'] == 9
  assert rep['validation_mismatched']['num_examples'] == 3


def test_periodic_eval_during_qat_measures_the_quantized_model():
  """The training loop's GLUE metrics of a QAT state are the quantized model's (as its eval
  loss), not those of the floating-point weights. STS-B: Pearson / Spearman are continuous, so
  FP and W4A8 + 2-bit embeddings cannot agree by chance."""
  import types
  import jax
  from oqt_jax import models
  from oqt_jax.quant.methods import qat
  from oqt_jax.train import evaluation
  from oqt_jax.train import sharding as shd
  from configs.glue import common
  c = common.glue('stsb')
  m = c.model
  m.vocab_size, m.hidden_size, m.num_layers, m.num_heads = 64, 32, 1, 2
  m.intermediate_size, m.max_position_embeddings = 64, 32
  c.quant.n_bits, c.quant.quant_dict = 4, "{'Et': 2}"
  c.quant.qat, c.quant.learn_ranges = True, 'minmax'
  model = models.build(models.from_config(c.model))
  params = models.init_variables(model, jax.random.PRNGKey(0))['params']
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2):
    ids = rng.integers(5, 64, (16, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:8, 9:] = 0
    batches.append({'input_ids': ids, 'attention_mask': mask, 'token_type_ids': 0 * ids,
                    'labels': rng.uniform(0, 5, 16).astype(np.float32)})
  quant_state = qat.calibrate_ranges(model, params, batches[:1], c)
  ds = types.SimpleNamespace(task_info=data.glue_task_info('stsb'),
                             eval_batches=lambda bs, num_batches=None: iter(batches))
  got = evaluation.evaluate(types.SimpleNamespace(params=params, quant=quant_state), c, ds,
                            batch_size=16, mesh=shd.create_mesh(c.mesh))
  qmodel = model.clone(quant=qat.train_hooks(c, model.cfg).with_mode('frozen'))
  want = glue_eval.evaluate_glue(qmodel, {'params': params, 'quant': quant_state}, c, batches)
  fp = glue_eval.evaluate_glue(model, {'params': params}, c, batches)
  assert got['glue_pearson'] == pytest.approx(want['pearson'], abs=1e-6)
  assert got['glue_spearmanr'] == pytest.approx(want['spearmanr'], abs=1e-6)
  assert abs(want['pearson'] - fp['pearson']) > 1e-3, (want, fp)
  assert got['eval_loss'] == pytest.approx(want['eval_loss'], rel=1e-4)


# --------------------------------------------------------------------------- end to end
