"""The FP32 GLUE fine-tuning recipe of transformer-quantization (EMNLP 2021), per task.

Where each number comes from:
  [README]   the original README's fine-tuning command (RTE): --learning-rate 3e-05
             --batch-size 8 --num-epochs 3 --max-seq-length 128 --seed 1000, bert_base_uncased.
  [CODE]     the original's option defaults, which that command leaves as they are and which it
             hands to the HF Trainer: AdamW (betas 0.9 / 0.999, eps 1e-8), linear decay,
             --warmup-steps 0, --weight-decay 0.0, --max-grad-norm None (no clipping),
             --pad-to-max-length (every sequence padded to 128), dropout of the pretrained
             config (0.1, --attn-dropout / --hidden-dropout unset); MNLI trains on train and
             reports validation_matched (eval.py also reports mismatched).
  [BERT]     the standard BERT GLUE values where the original states no per-task value (its
             per-task settings are in the paper's appendix, not in the README): lr 2e-5,
             batch 32, 3 epochs.
  [PTQ]      the README's base PTQ command: W8A8, weights symmetric MSE (golden section),
             activations asymmetric current_minmax, one estimation batch, quant_setup all.

The standard BERT recipe's 10% warmup and weight decay 0.01 are one flag away:
--config.warmup_ratio=0.1 --config.weight_decay=0.01.
"""
from configs import recipes

GLUE_INIT = 'bert-base-uncased'          # [README] --model-name bert_base_uncased


def glue(task: str, learning_rate: float = 2e-5, batch_size: int = 32,
         num_epochs: float = 3.0):
  c = recipes.bert_base()
  c.init_from = GLUE_INIT                # HF dir / hub name / train.py workdir
  m = c.model
  m.head = 'cls'
  m.num_labels = 1 if task == 'stsb' else (3 if task == 'mnli' else 2)  # stsb: regression
  m.hidden_dropout, m.attention_dropout = 0.1, 0.1       # [CODE] pretrained config's dropout
  d = c.data
  d.source, d.glue_task = 'glue', task
  d.tokenizer = ''                       # '' = the tokenizer of init_from
  d.max_seq_length = 128                 # [README] --max-seq-length 128
  c.seed = 1000                          # [README] --seed 1000 (seeds 1000-1004, median)
  c.learning_rate = learning_rate
  c.global_batch_size = batch_size       # the recipe's batch whatever the device count
  c.per_device_batch_size = batch_size
  c.gradient_accumulation_steps = 1
  c.num_train_epochs = num_epochs        # -> num_train_steps at run time
  c.num_train_steps = 1                  # placeholder, replaced from num_train_epochs
  c.warmup_steps, c.warmup_ratio = 0, -1.0               # [CODE] --warmup-steps 0
  c.lr_schedule = 'linear'                               # [CODE] HF Trainer default
  c.weight_decay = 0.0                                   # [CODE] --weight-decay 0.0
  c.max_grad_norm = 0.0                                  # [CODE] None: no clipping
  c.adam_b1, c.adam_b2, c.adam_eps = 0.9, 0.999, 1e-8    # [CODE] HF AdamW defaults
  c.eval_batch_size = 32
  c.num_eval_batches = 0                 # the whole dev set
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 50
  q = c.quant                                            # [PTQ]
  q.n_bits, q.n_bits_act = 8, 8
  q.qmethod, q.qmethod_acts = 'symmetric_uniform', 'asymmetric_uniform'
  q.ranges_weights, q.mse_search = 'mse', 'golden'
  q.ranges_acts = 'current_minmax'
  q.est_num_batches = 1
  q.quant_setup = 'all'
  return c
