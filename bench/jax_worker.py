"""oqt_jax side of the train-step benchmark (a worker process; protocol in torch_worker.py).

setup options: model_type, variant, shape, dtype ('float32' | 'bfloat16'), mesh (dict of
data / fsdp / tensor), plain_loss (true: the full-logit loss instead of the training fast
path, for ablations), dropout (false: no dropout, for ablations).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import shapes  # noqa: E402
import torch_worker  # noqa: E402  (the JSON-lines loop; importing torch there is harmless)
from oqt_jax import models  # noqa: E402
from oqt_jax.train import losses, optimizer  # noqa: E402
from oqt_jax.train import sharding as shd  # noqa: E402
from oqt_jax.train.state import create_train_state, state_shardings  # noqa: E402
from oqt_jax.train.step import make_train_step  # noqa: E402


def model_config(model_type: str, variant: str, num_layers, hidden_size, num_heads,
                 intermediate_size, seq_len, dtype='float32', dropout=True, vocab=None, **_):
  hd, ad = shapes.DROPOUT[model_type] if dropout else (0.0, 0.0)
  kw = dict(model_type=model_type, vocab_size=vocab or shapes.VOCAB[model_type],
            hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
            intermediate_size=intermediate_size, max_position_embeddings=512,
            hidden_dropout=hd, attention_dropout=ad, dtype=dtype)
  if model_type == 'opt':
    kw.update(activation='relu', layer_norm_eps=1e-5, pad_token_id=1, do_layer_norm_before=True,
              softmax_T=seq_len)
  if variant == 'clipped':
    if model_type == 'bert':
      kw['softmax'] = f'clipped({shapes.BERT_GAMMA}:{shapes.BERT_ZETA})'
    else:
      kw['alpha'] = shapes.OPT_ALPHA
  elif variant == 'gated':
    kw.update(gate='conditional_per_token', gate_mlp=model_type == 'bert',
              gate_init=shapes.GATE_INIT[model_type])
  return models.ModelConfig(**kw).validate()


def optimizer_config():
  return ml_collections.ConfigDict(dict(
      learning_rate=shapes.LR, warmup_steps=0, num_train_steps=1_000_000,
      lr_schedule='constant', max_grad_norm=shapes.MAX_GRAD_NORM, adam_b1=0.9, adam_b2=0.999,
      adam_eps=1e-8, weight_decay=shapes.WEIGHT_DECAY, decay_layer_norm=False))


_FAST_LOSS = losses.train_loss


def _PLAIN_LOSS(model, head, out, params, batch):
  return losses.loss_for_head(head, out.logits, batch)


class Runner:
  def setup(self, msg):
    t0 = time.perf_counter()
    mt, shape = msg['model_type'], msg['shape']
    losses.train_loss = (_PLAIN_LOSS if msg.get('plain_loss') else _FAST_LOSS)
    cfg = model_config(mt, msg['variant'], dtype=msg.get('dtype', 'float32'),
                       dropout=msg.get('dropout', True), **shape)
    model = models.build(cfg)
    tx, schedule = optimizer.make_optimizer(optimizer_config())
    mesh = shd.create_mesh(msg.get('mesh', dict(data=-1, fsdp=1, tensor=1)))
    shardings = state_shardings(model, tx, mesh)
    state = create_train_state(model, tx, mesh, seed=0, shardings=shardings)
    batch = shapes.make_batch(mt, shape['batch'], shape['seq_len'], seed=msg.get('seed', 0))
    if mt == 'opt':
      batch.pop('token_type_ids', None)
    keys = sorted(batch)
    bshard = shd.batch_sharding(mesh, 3, batch_dim=1)
    self.batch = {k: jax.device_put(np.asarray(v, np.int32)[None], bshard)
                  for k, v in batch.items()}
    self.step_fn = make_train_step(model, cfg.resolved_head, schedule, shardings, mesh, keys)
    t1 = time.perf_counter()
    compiled = self.step_fn.lower(state, self.batch).compile()
    compile_s = time.perf_counter() - t1
    mem = compiled.memory_analysis()
    self.state = state
    for _ in range(int(msg.get('warmup', 2))):
      self.step()
    dev0 = jax.devices()[0]
    per_dev = sum(s.data.nbytes for leaf in jax.tree.leaves((self.state.params,
                                                             self.state.opt_state))
                  for s in leaf.addressable_shards if s.device == dev0)
    return {'setup_s': time.perf_counter() - t0, 'compile_s': compile_s, 'jax': jax.__version__,
            'devices': jax.device_count(), 'state_bytes_per_device': per_dev,
            'step_temp_bytes': getattr(mem, 'temp_size_in_bytes', None)}

  def step(self):
    self.state, metrics = self.step_fn(self.state, self.batch)
    return float(jax.block_until_ready(metrics['loss']))

  def time(self, msg):
    times, loss = [], None
    for _ in range(int(msg.get('steps', 1))):
      t0 = time.perf_counter()
      loss = self.step()
      times.append(time.perf_counter() - t0)
    return {'times': times, 'loss': loss}


if __name__ == '__main__':
  torch_worker.serve(Runner())
