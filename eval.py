"""Evaluate a trained model: perplexity, outlier statistics, and (--quantize) W8A8 PTQ.

  python eval.py --config configs/tiny_bert_clipped_softmax.py --workdir runs/tiny_bert
  python eval.py --config configs/opt_125m_gated_attention.py --workdir runs/opt --quantize \
      --config.quant.quant_setup=fp32_head --config.quant.est_num_batches=4
  python eval.py --config configs/tiny_opt_gated_attention.py --workdir runs/tiny_opt \
      --prompt "the history of" --max_new_tokens 20 [--temperature 0.8 --top_k 40]
  python eval.py --config configs/bert_base_vanilla.py --workdir out --hf_model /path/to/hf_dir \
      --quantize --config.quant.quant_dict="{'x': 16, 'h': 16, 'y': 16}"
  python eval.py --config configs/tiny_opt_vanilla.py --workdir runs/opt --compare \
      --methods=fp,w8a8_minmax,llm_int8,weight_only
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

Loads --hf_model, or the newest of WORKDIR/hf and WORKDIR/checkpoints. Prints a per-layer
table and the summary, writes WORKDIR/eval_metrics.json, eval_per_layer.png and
eval_histogram.png. Exit status 2 with one line `error: ...` on a bad config, data or
checkpoint, or a model with non-finite parameters or loss.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                lock_config=False)
flags.DEFINE_string('workdir', None, 'Run directory of train.py (hf/ or checkpoints/); '
                    'eval_metrics.json and the plots are written there.')
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
flags.DEFINE_string('methods', None, 'With --compare: comma-separated rows (default all; '
                    'names in oqt_jax/quant/methods/compare.py).')
flags.DEFINE_string('prompt', None, 'OPT models: print a continuation of this text (KV-cache '
                    'generation with the run\'s tokenizer) instead of evaluating; with '
                    '--quantize the calibrated model generates.')
flags.DEFINE_integer('max_new_tokens', 20, '--prompt: tokens to generate.')
flags.DEFINE_float('temperature', 0.0, '--prompt: 0 = greedy, > 0 = sampling temperature.')
flags.DEFINE_integer('top_k', 0, '--prompt: sample among the top k tokens (0 = all).')
flags.mark_flags_as_required(['config', 'workdir'])


def _explicit_quant_fields(args):
  """The config.quant fields set on the command line (--config.quant.NAME[=VALUE])."""
  prefix = '--config.quant.'
  return [a[len(prefix):].split('=', 1)[0] for a in args if a.startswith(prefix)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from oqt_jax.errors import CheckpointError, ConfigError, DataError
  try:
    from oqt_jax.evaluate.run import evaluate_run, generate_text
    if FLAGS.prompt is not None:
      generate_text(FLAGS.config, FLAGS.workdir, FLAGS.prompt, hf_model=FLAGS.hf_model,
                    max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                    top_k=FLAGS.top_k, quantize=FLAGS.quantize, progress=FLAGS.progress)
      return
    if FLAGS.compare or FLAGS.methods:
      from oqt_jax.evaluate.comparison import compare_run
      compare_run(FLAGS.config, FLAGS.workdir, methods=FLAGS.methods, hf_model=FLAGS.hf_model,
                  num_batches=FLAGS.num_batches, batch_size=FLAGS.batch_size,
                  plots_on=FLAGS.plots, progress=FLAGS.progress)
      return
    method = FLAGS.config.get('quant', {}).get('method', '')
    evaluate_run(FLAGS.config, FLAGS.workdir, quantize=FLAGS.quantize or bool(method),
                 hf_model=FLAGS.hf_model, num_batches=FLAGS.num_batches,
                 batch_size=FLAGS.batch_size, plots_on=FLAGS.plots, progress=FLAGS.progress,
                 explicit_quant=_explicit_quant_fields(sys.argv[1:]))
  except (ConfigError, DataError, CheckpointError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(argv):
  from oqt_jax.config import parse_cli_flags   # every flag mistake: one line `error: ...`, exit 2
  return parse_cli_flags(argv)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
