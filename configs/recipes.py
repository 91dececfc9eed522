"""The paper's recipes (REFERENCE §1) as functions over configs.base; experiment files compose them.

Model families:  bert_base, opt_125m, opt_350m, opt_1_3b, and `tiny` (CPU-sized, same recipe);
`bigram_backcopy`: a CPU-sized OPT on the synthetic Bigram-Backcopy task, where vanilla
attention grows no-op heads and outliers (experiments/reproduce.py).
Attention variants: vanilla, clipped_softmax, gated_attention (the per-model paper settings);
beyond the paper: softmax1, sink, elementwise_gate.
"""
from configs import base


def bert_base():
  c = base.get_config()
  m = c.model
  m.model_type, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size = 'bert', 768, 12, 12, 3072
  m.vocab_size, m.max_position_embeddings, m.layer_norm_eps, m.activation = 30522, 512, 1e-12, 'gelu'
  m.init_std, m.hidden_dropout, m.attention_dropout, m.pad_token_id = 0.02, 0.1, 0.1, 0
  m.softmax_T = 128                        # alpha form: T = max_seq_length
  m.attention_init = 'torch_default'       # the originals' swapped-in attention Linears
  c.data.source, c.data.tokenizer, c.data.max_seq_length = 'bookcorpus_and_wiki', 'bert-base-uncased', 128
  c.data.mlm_probability = 0.15
  c.learning_rate, c.warmup_steps, c.num_train_steps = 1e-4, 10_000, 1_000_000
  c.per_device_batch_size, c.eval_batch_size = 256, 32
  c.global_batch_size = 256               # the paper's batch, whatever the device count
  c.weight_decay, c.max_grad_norm, c.adam_b1, c.adam_b2 = 0.01, 1.0, 0.9, 0.999
  c.checkpoint_every_steps, c.eval_every_steps = 100_000, 10_000
  # MLM evaluation keeps the MLM head in floating point, as the paper's validate_mlm does.
  c.quant.ranges_weights, c.quant.est_num_batches, c.quant.quant_setup = 'current_minmax', 16, 'fp32_head'
  return c


def _opt(hidden, layers, heads, ffn, max_pos, batch, accum, steps):
  c = base.get_config()
  m = c.model
  m.model_type, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size = 'opt', hidden, layers, heads, ffn
  m.vocab_size, m.max_position_embeddings, m.layer_norm_eps, m.activation = 50272, max_pos, 1e-5, 'relu'
  m.init_std, m.hidden_dropout, m.attention_dropout, m.pad_token_id = 0.006, 0.1, 0.0, 1
  m.do_layer_norm_before, m.softmax_T = True, 512   # alpha form: T = block_size
  m.attention_init = 'torch_default'       # the originals' swapped-in attention Linears
  c.data.source, c.data.tokenizer, c.data.block_size = 'bookcorpus_and_wiki', 'facebook/opt-350m', 512
  c.learning_rate, c.warmup_steps, c.num_train_steps = 4e-4, 2000, steps
  c.per_device_batch_size, c.gradient_accumulation_steps, c.eval_batch_size = batch, accum, 4
  c.global_batch_size = batch             # x accum = the paper's batch, whatever the device count
  c.weight_decay, c.decay_layer_norm, c.max_grad_norm = 0.1, True, 1.0
  c.adam_b1, c.adam_b2 = 0.9, 0.95
  c.checkpoint_every_steps, c.eval_every_steps = 10_000, 10_000
  c.quant.ranges_weights, c.quant.est_num_batches, c.quant.quant_setup = 'mse', 4, 'fp32_head'
  # The original README's OPT evaluation: running_minmax with percentile 99.999, i.e. an EMA
  # of the per-batch (0.001, 99.999) percentiles.
  c.quant.ranges_acts, c.quant.percentile = 'running_minmax', 99.999
  return c


def opt_125m():   # "12L12H": batch 48 x 4 accumulation = 192, 125k steps
  return _opt(768, 12, 12, 3072, 512, 48, 4, 125_000)


def opt_350m():
  """As the originals build it: OPTConfig() defaults, then the yaml fields. word_embed_proj_dim
  is not among them, so it stays 768 (project_in / project_out 768 <-> 1024); pre-LN; no
  weight decay on LayerNorm gamma (its script has no --wd_LN_gamma). HF's facebook/opt-350m
  (post-LN, 512 projection) is a different model."""
  c = _opt(1024, 24, 16, 4096, 1024, 24, 11, 100_000)
  c.model.do_layer_norm_before, c.model.word_embed_proj_dim = True, 768
  c.decay_layer_norm = False
  c.checkpoint_every_steps = 1000
  return c


def opt_1_3b():
  """OPTConfig() defaults then the yaml fields: pre-LN, project_in / project_out 768 <-> 2048,
  no LayerNorm-gamma decay."""
  c = _opt(2048, 24, 32, 8192, 1024, 14, 18, 100_000)
  c.model.word_embed_proj_dim = 768
  c.decay_layer_norm = False
  c.checkpoint_every_steps = 1000
  return c


def vanilla(c):
  c.model.softmax, c.model.gate = 'vanilla', 'none'
  return c


def clipped_softmax(c):
  if c.model.model_type == 'bert':
    c.model.softmax = 'clipped(-.025:1)'
  else:
    c.model.alpha = 12.0                 # gamma = -12 / 512
  return c


def gated_attention(c):
  c.model.gate = 'conditional_per_token'
  if c.model.model_type == 'bert':
    c.model.gate_mlp = True
  elif c.model.hidden_size >= 2048:      # OPT-1.3B
    c.model.gate_linear_all_features = True
  else:
    c.model.gate_init = 0.25
  return c


def tiny(c):
  """Same recipe at CPU size: trains on the embedded corpus (no network) in a few minutes."""
  m = c.model
  m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size = 128, 2, 4, 512
  m.vocab_size, m.max_position_embeddings = 2048, 128
  if m.model_type == 'opt':
    m.word_embed_proj_dim, m.do_layer_norm_before, m.init_std = -1, True, 0.02
  m.softmax_T = 128
  c.data.source, c.data.tokenizer, c.data.tokenizer_vocab_size = 'embedded', '', 2048
  c.data.max_seq_length, c.data.block_size = 128, 128
  c.num_train_steps, c.warmup_steps, c.learning_rate = 600, 60, 1e-3
  c.per_device_batch_size, c.gradient_accumulation_steps, c.eval_batch_size = 16, 1, 16
  c.global_batch_size = -1
  c.num_eval_batches = 8
  c.checkpoint_every_steps, c.eval_every_steps, c.log_every_steps = 200, 200, 20
  c.quant.est_num_batches = 4
  return c


def softmax1(c):
  c.model.softmax, c.model.gate = 'softmax1', 'none'
  return c


def sink(c):
  c.model.softmax, c.model.gate = 'sink', 'none'
  return c


def elementwise_gate(c):
  c.model.softmax, c.model.gate = 'vanilla', 'elementwise'
  return c


def outlier_safe(c):
  """Outlier-Safe Pre-training's recipe (Park et al., 2025) with vanilla attention: Muon on
  the hidden weight matrices and every norm a single-scale RMSNorm (its learnable embedding
  projection is not included)."""
  c.model.softmax, c.model.gate = 'vanilla', 'none'
  c.model.norm = 'ssnorm'
  c.optimizer = 'muon'
  return c


def bigram_backcopy(c):
  """A pre-LN OPT small enough for 2 CPU cores on the synthetic Bigram-Backcopy task.

  The OPT recipe (ReLU, AdamW betas (0.9, 0.95), torch_default attention init, W8A8 with
  fp32_head and running percentiles), shrunk; see experiments/reproduce.py for how the
  setting was found.
  """
  m = c.model
  m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size = 64, 2, 4, 256
  m.max_position_embeddings, m.word_embed_proj_dim, m.do_layer_norm_before = 64, -1, True
  m.init_std, m.hidden_dropout, m.attention_dropout = 0.02, 0.0, 0.0
  m.softmax_T = 64
  c.data.source, c.data.tokenizer = 'synthetic', ''
  c.data.synthetic.seq_length = 64
  c.num_train_steps, c.warmup_steps, c.learning_rate, c.lr_schedule = 2000, 100, 3e-3, 'constant'
  c.per_device_batch_size, c.gradient_accumulation_steps, c.eval_batch_size = 32, 1, 64
  c.global_batch_size = 32
  c.weight_decay, c.decay_layer_norm = 0.0, False
  c.num_eval_batches = 4
  c.checkpoint_every_steps, c.eval_every_steps, c.log_every_steps = 1000, 500, 50
  c.quant.est_num_batches = 4
  return c
