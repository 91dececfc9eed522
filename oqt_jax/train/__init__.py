"""Training: sharded state and steps on a (data, fsdp, tensor) mesh, Orbax checkpoints, loop.

  from oqt_jax.train import train_and_evaluate, evaluate
  summary = train_and_evaluate(config, workdir)      # what train.py runs
  metrics = evaluate(state, config, ds)              # eval loss / perplexity (+ registered hooks)

Modules: config (validate_train_config), losses (MLM / CLM as (sum, count)), optimizer (AdamW,
schedule, decay mask), sharding (mesh, logical-axis rules, jax.distributed start-up), state
(TrainState created in its shardings), step (the jitted train step), checkpoint (Orbax
manager with corrupt-step fallback), metrics (TensorBoard + metrics.jsonl), evaluation
(`evaluate` and its extension hook), loop (`train_and_evaluate`), testing (test helpers).
"""
from oqt_jax.train.config import validate_train_config
from oqt_jax.train.evaluation import evaluate, register_eval_metrics
from oqt_jax.train.loop import train_and_evaluate
from oqt_jax.train.state import TrainState

__all__ = ['TrainState', 'evaluate', 'register_eval_metrics', 'train_and_evaluate',
           'validate_train_config']
