"""Evaluate a trained model: perplexity, outlier statistics, and (--quantize) W8A8 PTQ.

  python eval.py --hf_model /path/to/hf_dir [--quantize]   # model, tokenizer from the dir
  python eval.py --config configs/tiny_bert_clipped_softmax.py --workdir runs/tiny_bert
  python eval.py --config configs/opt_125m_gated_attention.py --workdir runs/opt --quantize \
      --config.quant.quant_setup=fp32_head --config.quant.est_num_batches=4
  python eval.py --config configs/tiny_opt_gated_attention.py --workdir runs/tiny_opt \
      --prompt "the history of" --max_new_tokens 20 [--temperature 0.8 --top_k 40]
  python eval.py --config configs/bert_base_vanilla.py --workdir out --hf_model /path/to/hf_dir \
      --quantize --config.quant.quant_dict="{'x': 16, 'h': 16, 'y': 16}" --out w8a16
  python eval.py --config configs/tiny_opt_vanilla.py --workdir runs/opt --compare \
      --methods=fp,w8a8_minmax,llm_int8,weight_only [--setting original|all|both]
  python eval.py --config configs/tiny_opt_vanilla.py --workdir runs/tiny_opt --quantize \
      --config.quant.n_bits=4 --config.quant.adaround=True      # AdaRound W4A8

A QAT workdir (train.py --config.quant.qat=True) is evaluated with the quantizers it learned.
  python eval.py --config configs/glue/rte.py --workdir runs/rte --quantize   # + GLUE task metrics
  python eval.py --config configs/tiny_bert_vanilla.py --workdir runs/tiny_bert \
      --config.quant.method=outlier_suppression      # Gamma Migration + Token-Wise Clipping

--config.quant.method (implies --quantize) picks the quantization method of
oqt_jax.quant.methods ('' = plain calibration, outlier_suppression, smoothquant, ...); a
method's preset (e.g. W6A6 per-channel weights, 256 calibration samples for
outlier_suppression) fills every quant field not given on the command line.

Loads --hf_model, or the newest of WORKDIR/hf and WORKDIR/checkpoints. Without --config:
the model settings come from the checkpoint, the data from the embedded corpus (--hf_model)
or from the run's WORKDIR/config.json. On a workdir the data settings the run recorded in
WORKDIR/config.json are used unless given on the command line; a checkpoint dir's tokenizer
is used unless --config.data.tokenizer is given. Prints a per-layer table and the summary,
writes WORKDIR/eval_NAME.json, eval_NAME_per_layer.png and eval_NAME_histogram.png (NAME:
--out, or fp / w8a8 / w4a8_adaround / ... from what was evaluated) and eval_metrics.json (a
copy of the newest). Exit status 2 with one line `error: ...` on a bad config, data or
checkpoint, or a model with non-finite parameters or loss.
"""
import os
import sys

os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')   # no "PyTorch was not found" notice

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_FLAGS_BEFORE = set(FLAGS)
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                lock_config=False)
flags.DEFINE_string('workdir', None, 'Run directory of train.py (hf/ or checkpoints/); '
                    'eval_NAME.json and the plots are written there (default with '
                    '--hf_model: that dir).')
flags.DEFINE_string('out', None, 'NAME of this evaluation\'s files (eval_NAME.json, '
                    'eval_NAME_*.png); default from what is evaluated (fp, w8a8, ...).')
flags.DEFINE_string('hf_model', None, 'Evaluate this HF checkpoint dir (with its tokenizer) '
                    'instead of the workdir run.')
flags.DEFINE_bool('quantize', False, 'Also calibrate and evaluate the quantized model '
                  '(config.quant: W8A8 per-tensor by default).')
flags.DEFINE_integer('num_batches', None, 'Evaluation batches (default config.num_eval_batches).')
flags.DEFINE_integer('batch_size', None, 'Evaluation batch size (default config.eval_batch_size).')
flags.DEFINE_bool('plots', True, 'Write the PNG plots.')
flags.DEFINE_bool('progress', True, 'Show a tqdm progress bar.')
flags.DEFINE_bool('compare', False, 'Compare every quantization method on the same data: '
                  'WORKDIR/comparison.md, .json, .png (oqt_jax/evaluate/comparison.py).')
flags.DEFINE_string('methods', None, 'With --compare: comma-separated registered methods '
                    '(default all; oqt_jax.quant.methods.names()).')
flags.DEFINE_enum('setting', 'original', ['original', 'all', 'both'],
                  "With --compare: each method's preset (its original's setting), 'all' (W8A8 "
                  'per-tensor, every point quantized, the method applied), or both rows.')
flags.DEFINE_string('prompt', None, 'OPT models: print a continuation of this text (KV-cache '
                    'generation with the run\'s tokenizer) instead of evaluating; with '
                    '--quantize the calibrated model generates.')
flags.DEFINE_integer('max_new_tokens', 20, '--prompt: tokens to generate.')
flags.DEFINE_float('temperature', 0.0, '--prompt: 0 = greedy, > 0 = sampling temperature.')
flags.DEFINE_integer('top_k', 0, '--prompt: sample among the top k tokens (0 = all).')
flags.DEFINE_integer('seed', None, '--prompt: sampling seed (default config.seed).')
flags.DEFINE_bool('analyze', False, 'The outlier mechanism: per layer the outlier dims and '
                  'the tokens they occur at, per head the attention mass on delimiter tokens '
                  'and their value norms; writes WORKDIR/analysis.json and analysis.png.')


_OWN_FLAGS = sorted(set(FLAGS) - _FLAGS_BEFORE)   # listed by --help

def _explicit_quant_fields(args):
  """The config.quant fields set on the command line (--config.quant.NAME[=VALUE])."""
  prefix = '--config.quant.'
  return [a[len(prefix):].split('=', 1)[0] for a in args if a.startswith(prefix)]


def _check_quant_flags(explicit, quantize: bool):
  """--config.quant.* without --quantize or a method would be ignored: an error instead."""
  from oqt_jax.errors import ConfigError
  fields = [f for f in explicit if f.startswith('quant.') and f != 'quant.method']
  if fields and not quantize and not FLAGS.compare and not FLAGS.methods:
    raise ConfigError(f'--config.{fields[0]}: a quantization setting without --quantize (or '
                      '--config.quant.method); add --quantize to evaluate the quantized model')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from oqt_jax.errors import CheckpointError, ConfigError, DataError
  try:
    from oqt_jax.evaluate.generation import generate_text
    from oqt_jax.evaluate.run import evaluate_run
    from oqt_jax.evaluate.setup import eval_config, explicit_fields
    workdir = FLAGS.workdir
    if FLAGS.hf_model:
      from oqt_jax.data.sources import unreachable_name
      why = unreachable_name(FLAGS.hf_model)
      if why:
        raise CheckpointError(f'--hf_model={FLAGS.hf_model}: {why}')
    if not workdir and FLAGS.hf_model:   # results beside the checkpoint
      if not os.path.isdir(os.path.expanduser(FLAGS.hf_model)):
        raise ConfigError(f'--workdir: needed with --hf_model={FLAGS.hf_model} (not a local '
                          'directory to write the results beside)')
      workdir = os.path.expanduser(FLAGS.hf_model)
    if not workdir:
      raise ConfigError('--workdir: needed (a train.py run directory), or --hf_model DIR')
    explicit = explicit_fields(sys.argv[1:])
    config = eval_config(FLAGS.config, workdir, FLAGS.hf_model, explicit)
    if _LATE_OVERRIDES:
      from oqt_jax.config import apply_overrides
      config = apply_overrides(config, _LATE_OVERRIDES)
    method = config.get('quant', {}).get('method', '')
    from oqt_jax.quant import methods as registry
    registry.check_name(method, '--config.quant.method')
    if FLAGS['setting'].present and not (FLAGS.compare or FLAGS.methods):
      raise ConfigError(f'--setting={FLAGS.setting}: only with --compare')
    _check_quant_flags(explicit, FLAGS.quantize or bool(method))
    if FLAGS.prompt is not None:
      generate_text(config, workdir, FLAGS.prompt, hf_model=FLAGS.hf_model,
                    max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                    top_k=FLAGS.top_k, quantize=FLAGS.quantize, progress=FLAGS.progress,
                    seed=FLAGS.seed)
      return
    if FLAGS.analyze:
      from oqt_jax.evaluate.analysis import analyze_run
      analyze_run(config, workdir, hf_model=FLAGS.hf_model, num_batches=FLAGS.num_batches,
                  batch_size=FLAGS.batch_size, plots_on=FLAGS.plots)
      return
    if FLAGS.compare or FLAGS.methods:
      from oqt_jax.evaluate.comparison import compare_run
      compare_run(config, workdir, methods=FLAGS.methods, hf_model=FLAGS.hf_model,
                  setting=FLAGS.setting, num_batches=FLAGS.num_batches,
                  batch_size=FLAGS.batch_size, plots_on=FLAGS.plots, progress=FLAGS.progress,
                  explicit_quant=_explicit_quant_fields(sys.argv[1:]))
      return
    evaluate_run(config, workdir, quantize=FLAGS.quantize or bool(method),
                 hf_model=FLAGS.hf_model, num_batches=FLAGS.num_batches,
                 batch_size=FLAGS.batch_size, plots_on=FLAGS.plots, progress=FLAGS.progress,
                 explicit_quant=_explicit_quant_fields(sys.argv[1:]), out=FLAGS.out)
  except (ConfigError, DataError, CheckpointError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr, flush=True)
    sys.exit(2)


# --config.FIELD=VALUE given without --config: applied to the config eval.py builds itself.
_LATE_OVERRIDES = []


def _parse_flags(argv):
  from oqt_jax.config import help_requested, parse_cli_flags, print_help, split_late_overrides
  if help_requested(argv):   # --help / -h: this docstring and the flags, exit 0
    print_help(__doc__, FLAGS, _OWN_FLAGS)
    sys.exit(0)
  argv, late = split_late_overrides(argv)
  _LATE_OVERRIDES[:] = late
  return parse_cli_flags(argv)   # every flag mistake: one line `error: ...`, exit 2


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
