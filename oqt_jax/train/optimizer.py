"""AdamW with warmup + decay, weight-decay mask and global-norm clipping (optax).

Schedule: linear warmup 0 -> learning_rate over warmup_steps, then
  linear:   linear decay to 0 at num_train_steps (the recipes' schedule)
  cosine:   cosine decay to 0 at num_train_steps
  constant: stay at learning_rate
Weight decay applies to kernels and embeddings, never to biases; LayerNorm gamma ('scale')
is decayed only with config.decay_layer_norm (OPT's recipe), LayerNorm beta never.

config.optimizer='muon' (Outlier-Safe Pre-training's optimizer): optax.contrib.muon on the
hidden weight matrices (every 2-D Dense kernel but the classifier's and the gates'): Nesterov
momentum 0.95, the update orthogonalised by 5 Newton-Schulz steps, then scaled to RMS
0.2 x sqrt(max(fan_in, fan_out)) (Moonlight's rule: the update RMS of AdamW, so learning_rate
and weight_decay carry over); AdamW as above on everything else (embeddings, biases, norms,
gates, the classifier).
"""
from __future__ import annotations

import flax
import jax
import optax
from optax import contrib

NO_DECAY_NAMES = ('bias', 'bias1', 'bias2', 'mlm_bias')
LAYER_NORM_SCALE = 'scale'
MUON_BETA = 0.95          # Muon's momentum (optax's and Keller Jordan's default)
MUON_RMS = 0.2            # update RMS matched to AdamW's (Moonlight)
ADAM_ONLY_MODULES = ('classifier', 'gate')


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


def muon_labels(params):
  """Tree of 'muon' (2-D Dense kernels of the hidden layers) / 'adamw' (everything else)."""
  flat = flax.traverse_util.flatten_dict(params)
  labels = {}
  for path, x in flat.items():
    names = [str(p) for p in path]
    hidden_matrix = (names[-1] == 'kernel' and getattr(x, 'ndim', 0) == 2
                     and not any(n in ADAM_ONLY_MODULES for n in names[:-1]))
    labels[path] = 'muon' if hidden_matrix else 'adamw'
  return flax.traverse_util.unflatten_dict(labels)


def make_optimizer(config, params=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule) for the flat training fields of `config`. `params` (arrays or
  ShapeDtypeStructs) is needed by optimizer='muon': which leaves are hidden matrices."""
  schedule = make_schedule(config)
  decay_ln = bool(config.get('decay_layer_norm', False))
  # identity() keeps the state layout the same with and without clipping (checkpoints).
  clip = float(config.max_grad_norm)
  parts = [optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()]
  adamw = optax.adamw(schedule, b1=float(config.adam_b1), b2=float(config.adam_b2),
                      eps=float(config.adam_eps), weight_decay=float(config.weight_decay),
                      mask=lambda p: weight_decay_mask(p, decay_ln))
  if config.get('optimizer', 'adamw') == 'muon':
    every_leaf_a_matrix = lambda p: jax.tree.map(lambda _: contrib.MuonDimensionNumbers(), p)
    muon = contrib.muon(schedule, beta=MUON_BETA, weight_decay=float(config.weight_decay),
                        consistent_rms=MUON_RMS, muon_weight_dimension_numbers=every_leaf_a_matrix)
    if params is None:
      raise ValueError("make_optimizer: optimizer='muon' needs the params (or their shapes)")
    parts.append(optax.multi_transform({'muon': muon, 'adamw': adamw}, muon_labels(params)))
  else:
    parts.append(adamw)
  return optax.chain(*parts), schedule
