"""Pretrain BERT (MLM) or OPT (CLM) with clipped softmax / gated attention.

  python train.py --config configs/tiny_opt_gated_attention.py --workdir runs/tiny_opt
  python train.py --config configs/opt_125m_gated_attention.py --workdir /shared/runs/opt \
      --config.per_device_batch_size=8 --config.mesh.fsdp=-1 --config.mesh.data=1

Rerunning the same command resumes from the newest readable checkpoint in
WORKDIR/checkpoints. The same command runs on one CPU, one GPU, a TPU VM or, launched once
per host (SLURM srun, TPU `--worker=all`), a multi-host cluster.
Exit status: 0 done, 2 bad config / data / checkpoint, non-finite loss (config.nonfinite) or
a failed checkpoint save (one line `error: ...`), 128+signal
when stopped by SIGTERM / SIGINT after saving a checkpoint.
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
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, tokenizer, hf export.')
flags.DEFINE_enum('distributed', 'auto', ['auto', 'yes', 'no'],
                  'jax.distributed.initialize(): auto = when the environment is a multi-process '
                  'job (SLURM, Open MPI, multi-host TPU, JAX_COORDINATOR_ADDRESS).')
flags.DEFINE_bool('progress', True, 'Show a tqdm progress bar.')
flags.mark_flags_as_required(['config', 'workdir'])


_OWN_FLAGS = sorted(set(FLAGS) - _FLAGS_BEFORE)   # listed by --help

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS['verbosity'].present:       # Orbax logs every save at INFO; keep stderr readable
    logging.set_verbosity(logging.WARNING)
  from oqt_jax.errors import CheckpointError, ConfigError, DataError, NonFiniteError
  try:
    from oqt_jax.train import sharding
    sharding.maybe_initialize_distributed(FLAGS.distributed)
    from oqt_jax.train.loop import train_and_evaluate
    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
  except (ConfigError, DataError, CheckpointError, NonFiniteError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr, flush=True)
    sys.exit(2)
  if summary.get('interrupted'):
    sys.exit(128 + int(summary['interrupted']))


def _parse_flags(argv):
  from oqt_jax.config import help_requested, parse_cli_flags, print_help
  if help_requested(argv):   # --help / -h: this docstring and the flags, exit 0
    print_help(__doc__, FLAGS, _OWN_FLAGS)
    sys.exit(0)
  return parse_cli_flags(argv)   # every flag mistake: one line `error: ...`, exit 2


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
