"""Converting a pretrained BERT / OPT checkpoint into an attention variant by distillation.

The student starts from `init_from` (an HF dir, hub name or train.py workdir) with the
variant's attention switched on; the teacher is that checkpoint, frozen (config.loss =
'distill': MSE of the final hidden states over non-padding tokens). Same data, steps and seed
for every variant:
  vanilla  the control: the same training without a change of attention;
  gated    conditional_per_token gates in fine-tuning mode (hidden weights N(0, 0.01) for
           BERT, 0.001 for OPT, as the original; the last Linear zero, gate_last_init_std=0,
           so sigmoid(logit(gate_init)) / gate_init = 1 exactly at the start): step 0
           is the checkpoint's function;
  clipped  clipped softmax (BERT: gamma = -0.025, OPT: alpha 12).
The budget below fits a 6-layer, 384-wide BERT on a few CPU cores; experiments/convert.py
sets init_from and scales steps / lengths per mode.
"""
from configs import recipes

VARIANTS = ('vanilla', 'gated', 'clipped')


def convert(variant: str, model_type: str = 'bert'):
  if variant not in VARIANTS:
    raise ValueError(f'variant {variant!r}: expected one of {VARIANTS}')
  c = recipes.bert_base() if model_type == 'bert' else recipes.opt_125m()
  c.init_from = ''                       # set at run time (--config.init_from=DIR)
  c.loss = 'distill'
  c.distill_mlm_weight = 0.0
  m = c.model
  m.hidden_dropout, m.attention_dropout = 0.0, 0.0   # the teacher's function, not a regulariser
  if variant == 'gated':
    recipes.gated_attention(c)
    m.fine_tuning = True
    m.gate_last_init_std = 0.0           # exact identity start (the original: N(0, 0.01))
  elif variant == 'clipped':
    recipes.clipped_softmax(c)
  d = c.data
  d.source, d.tokenizer = 'embedded', ''  # '' = the checkpoint's tokenizer
  d.max_seq_length, d.block_size = 64, 64
  m.softmax_T = 64
  c.num_train_steps, c.warmup_steps, c.learning_rate = 100, 10, 1e-4
  c.lr_schedule = 'linear'
  c.weight_decay = 0.0
  c.per_device_batch_size, c.global_batch_size, c.gradient_accumulation_steps = 16, 16, 1
  c.eval_batch_size, c.num_eval_batches, c.eval_every_steps = 16, 0, 0
  c.checkpoint_every_steps, c.log_every_steps = 50, 10
  c.seed = 0
  return c
