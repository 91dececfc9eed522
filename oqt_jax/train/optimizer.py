"""AdamW with warmup + decay, weight-decay mask and global-norm clipping (optax).

Schedule: linear warmup 0 -> learning_rate over warmup_steps, then
  linear:   linear decay to 0 at num_train_steps (the recipes' schedule)
  cosine:   cosine decay to 0 at num_train_steps
  constant: stay at learning_rate
Weight decay applies to kernels and embeddings, never to biases; LayerNorm gamma ('scale')
is decayed only with config.decay_layer_norm (OPT's recipe), LayerNorm beta never.
"""
from __future__ import annotations

import flax
import optax

NO_DECAY_NAMES = ('bias', 'bias1', 'bias2', 'mlm_bias')
LAYER_NORM_SCALE = 'scale'


def make_schedule(config) -> optax.Schedule:
  lr = float(config.learning_rate)
  warmup = int(config.warmup_steps)
  total = int(config.num_train_steps)
  decay_steps = max(total - warmup, 1)
  kind = config.get('lr_schedule', 'linear')
  if kind == 'linear':
    after = optax.linear_schedule(lr, 0.0, decay_steps)
  elif kind == 'cosine':
    after = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    after = optax.constant_schedule(lr)
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def weight_decay_mask(params, decay_layer_norm: bool = False):
  """Tree of bools: True where weight decay applies."""
  flat = flax.traverse_util.flatten_dict(params)
  mask = {}
  for path, _ in flat.items():
    name = str(path[-1])
    if name in NO_DECAY_NAMES or name.endswith('bias'):
      mask[path] = False
    elif name == LAYER_NORM_SCALE:
      mask[path] = bool(decay_layer_norm)
    else:
      mask[path] = True
  return flax.traverse_util.unflatten_dict(mask)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule) for the flat training fields of `config`."""
  schedule = make_schedule(config)
  decay_ln = bool(config.get('decay_layer_norm', False))
  # identity() keeps the state layout the same with and without clipping (checkpoints).
  clip = float(config.max_grad_norm)
  parts = [optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()]
  parts.append(optax.adamw(schedule, b1=float(config.adam_b1), b2=float(config.adam_b2),
                           eps=float(config.adam_eps), weight_decay=float(config.weight_decay),
                           mask=lambda p: weight_decay_mask(p, decay_ln)))
  return optax.chain(*parts), schedule
