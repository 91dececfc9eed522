"""PyTorch + HF transformers side of the train-step benchmark (a worker process).

Runs under any Python with torch, transformers and numpy (e.g. a transformers 4.31
environment given with --ref-python); does not import oqt_jax. Talks JSON lines on
stdin/stdout: {"cmd": "setup", ...} builds a model, optimizer and batch and warms up;
{"cmd": "time", "steps": n} runs n train steps and returns their wall times;
{"cmd": "maxrss"}; {"cmd": "quit"}.

Clipped softmax and gated attention are applied to HF attention by swapping each layer's
self-attention module for `PatchedSelfAttention`, which reuses the HF projections and
computes softmax / clipped softmax / the per-token gate with the same formulas as oqt_jax.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import shapes  # noqa: E402

TF_MAJOR = int(transformers.__version__.split('.')[0])


class Gate(nn.Module):
  """conditional_per_token gate: pi = sigmoid(f_h(x_h)) per head and token, x split into
  heads; f a per-head Linear(d, 1) or (gate_mlp) Linear(d, d/4) -> ReLU -> Linear(d/4, 1)."""

  def __init__(self, heads, head_dim, mlp, gate_init, std=0.02):
    super().__init__()
    self.heads, self.mlp = heads, mlp
    b0 = -math.log(1.0 / gate_init - 1.0)
    if mlp:
      d4 = head_dim // 4
      self.w1 = nn.Parameter(torch.randn(heads, head_dim, d4) * std)
      self.b1 = nn.Parameter(torch.zeros(heads, d4))
      self.w2 = nn.Parameter(torch.randn(heads, d4) * std)
      self.b2 = nn.Parameter(torch.full((heads,), b0))
    else:
      self.w = nn.Parameter(torch.randn(heads, head_dim) * std)
      self.b = nn.Parameter(torch.full((heads,), b0))

  def forward(self, x):                                   # (B, T, D) -> (B, H, T, 1)
    b, t, _ = x.shape
    xh = x.view(b, t, self.heads, -1)
    if self.mlp:
      hid = torch.relu(torch.einsum('bthd,hde->bhte', xh, self.w1) + self.b1[None, :, None, :])
      logits = torch.einsum('bhte,he->bht', hid, self.w2) + self.b2[None, :, None]
    else:
      logits = torch.einsum('bthd,hd->bht', xh, self.w) + self.b[None, :, None]
    return torch.sigmoid(logits)[..., None]


class PatchedSelfAttention(nn.Module):
  """Self-attention with (clipped) softmax and an optional gate, over an HF module's
  projections. BERT: returns the context (BertSelfOutput applies the output dense);
  OPT: applies out_proj, as OPTAttention does."""

  def __init__(self, hf_attn, model_type, heads, hidden, p_drop, gamma, zeta, gate):
    super().__init__()
    self.model_type, self.heads, self.head_dim = model_type, heads, hidden // heads
    if model_type == 'bert':
      self.q, self.k, self.v = hf_attn.query, hf_attn.key, hf_attn.value
      self.out = None
    else:
      self.q, self.k, self.v = hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj
      self.out = hf_attn.out_proj
    self.p_drop, self.gamma, self.zeta = p_drop, gamma, zeta
    self.gate = (Gate(heads, self.head_dim, mlp=model_type == 'bert',
                      gate_init=shapes.GATE_INIT[model_type]) if gate else None)

  def forward(self, hidden_states, *args, attention_mask=None, **kwargs):
    if attention_mask is None and args and isinstance(args[0], torch.Tensor):
      attention_mask = args[0]
    if attention_mask is None:
      attention_mask = kwargs.get('causal_attention_mask')
    x = hidden_states
    b, t, _ = x.shape
    split = lambda y: y.view(b, t, self.heads, self.head_dim).transpose(1, 2)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    clipped = not (self.gamma == 0.0 and self.zeta == 1.0)
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
      mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
    if mask is None and self.model_type == 'opt':
      mask = torch.full((t, t), torch.finfo(q.dtype).min).triu(1)[None, None]
    p_drop = self.p_drop if self.training else 0.0
    if not clipped:       # plain softmax: PyTorch's fused attention (its fastest path)
      ctx = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
    else:
      scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5
      if mask is not None:
        scores = scores + mask
      probs = torch.softmax(scores, dim=-1)
      probs = torch.clip((self.zeta - self.gamma) * probs + self.gamma, 0.0, 1.0)
      probs = nn.functional.dropout(probs, p=p_drop, training=self.training)
      ctx = torch.matmul(probs, v)
    if self.gate is not None:
      ctx = ctx * self.gate(x)
    ctx = ctx.transpose(1, 2).reshape(b, t, -1)
    if self.out is not None:
      ctx = self.out(ctx)
    if self.model_type == 'opt' and TF_MAJOR < 5:
      return ctx, None, None
    return ctx, None


def build(model_type, variant, num_layers, hidden_size, num_heads, intermediate_size, seq_len,
          **_):
  hd, ad = shapes.DROPOUT[model_type]
  # Vanilla: HF's default fastest attention (SDPA where the version has it); the patched
  # variants need the eager mask format.
  kw = {'attn_implementation': 'sdpa' if variant == 'vanilla' else 'eager'}
  if model_type == 'bert':
    cfg = transformers.BertConfig(
        vocab_size=shapes.VOCAB['bert'], hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=512, hidden_dropout_prob=hd, attention_probs_dropout_prob=ad,
        **kw)
    model = transformers.BertForMaskedLM(cfg)
    layers = [(l.attention, 'self', l.attention.self) for l in model.bert.encoder.layer]
  else:
    cfg = transformers.OPTConfig(
        vocab_size=shapes.VOCAB['opt'], hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, ffn_dim=intermediate_size, max_position_embeddings=512,
        word_embed_proj_dim=hidden_size, do_layer_norm_before=True, dropout=hd,
        attention_dropout=ad, activation_function='relu', enable_bias=True, **kw)
    model = transformers.OPTForCausalLM(cfg)
    layers = [(l, 'self_attn', l.self_attn) for l in model.model.decoder.layers]
  if variant != 'vanilla':
    gamma, zeta = shapes.gamma_zeta(model_type, seq_len) if variant == 'clipped' else (0.0, 1.0)
    for parent, name, attn in layers:
      setattr(parent, name, PatchedSelfAttention(attn, model_type, num_heads, hidden_size, ad,
                                                 gamma, zeta, gate=variant == 'gated'))
  return model


class Runner:
  def __init__(self):
    self.model = None

  def setup(self, msg):
    torch.manual_seed(0)
    if msg.get('threads'):
      torch.set_num_threads(int(msg['threads']))
    t0 = time.perf_counter()
    mt = msg['model_type']
    model = build(mt, msg['variant'], **msg['shape'])
    model.train()
    decay = [p for n, p in model.named_parameters() if not n.endswith('bias') and 'LayerNorm' not in n and 'layer_norm' not in n]
    no_decay = [p for n, p in model.named_parameters() if n.endswith('bias') or 'LayerNorm' in n or 'layer_norm' in n]
    self.opt = torch.optim.AdamW([{'params': decay, 'weight_decay': shapes.WEIGHT_DECAY},
                                  {'params': no_decay, 'weight_decay': 0.0}], lr=shapes.LR)
    shape = msg['shape']
    batch = shapes.make_batch(mt, shape['batch'], shape['seq_len'], seed=msg.get('seed', 0))
    self.batch = {k: torch.tensor(v) for k, v in batch.items()}
    if mt == 'opt':
      self.batch.pop('token_type_ids', None)
    self.model = model
    for _ in range(int(msg.get('warmup', 2))):
      self.step()
    return {'setup_s': time.perf_counter() - t0, 'transformers': transformers.__version__,
            'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'attn': getattr(model.config, '_attn_implementation', 'eager')}

  def step(self):
    out = self.model(**self.batch)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), shapes.MAX_GRAD_NORM)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return out.loss.detach().item()

  def time(self, msg):
    times, loss = [], None
    for _ in range(int(msg.get('steps', 1))):
      t0 = time.perf_counter()
      loss = self.step()
      times.append(time.perf_counter() - t0)
    return {'times': times, 'loss': loss}


def maxrss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def serve(runner):
  """The JSON-lines loop shared by both workers."""
  out = sys.stdout
  sys.stdout = sys.stderr          # library prints must not corrupt the protocol
  for line in sys.stdin:
    msg = json.loads(line)
    cmd = msg.get('cmd')
    if cmd == 'quit':
      break
    try:
      if cmd == 'setup':
        reply = runner.setup(msg)
      elif cmd == 'time':
        reply = runner.time(msg)
      elif cmd == 'maxrss':
        reply = {'maxrss_mb': maxrss_mb()}
      else:
        reply = getattr(runner, cmd)(msg)
    except Exception as e:  # reported to the driver, which prints it
      import traceback
      reply = {'error': f'{type(e).__name__}: {e}', 'trace': traceback.format_exc()[-2000:]}
    out.write(json.dumps(reply) + '\n')
    out.flush()


if __name__ == '__main__':
  serve(Runner())
