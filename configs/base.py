"""Shared defaults for every experiment: the one place a default is written.

Experiment files import `get_config()` from here and change only what differs.
Training fields are flat (Flax-examples style); model fields live under
`config.model`, data fields under `config.data`, quantization fields under
`config.quant`, device-mesh fields under `config.mesh`.
"""
import ml_collections


def model_defaults() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.model_type = 'bert'            # 'bert' | 'opt'
  m.head = 'auto'                  # 'auto' (mlm for bert, clm for opt) | 'mlm' | 'clm' | 'cls' | 'none'
  m.vocab_size = 30522
  m.hidden_size = 768
  m.num_layers = 12
  m.num_heads = 12
  m.intermediate_size = 3072
  m.max_position_embeddings = 512
  m.type_vocab_size = 2            # BERT only
  m.layer_norm_eps = 1e-12
  m.hidden_dropout = 0.1
  m.attention_dropout = 0.1
  m.activation = 'gelu'            # 'gelu' (exact erf) | 'gelu_new' (tanh) | 'relu'
  m.init_std = 0.02
  m.pad_token_id = 0
  m.num_labels = 2                 # sequence classification; 1 = regression
  # OPT only
  m.do_layer_norm_before = True
  m.word_embed_proj_dim = -1       # -1: same as hidden_size
  m.remove_final_layer_norm = False
  m.enable_bias = True
  # Attention variants (outlier-free-transformers).
  m.softmax = 'vanilla'            # 'vanilla' | 'clipped(GAMMA:ZETA)' | 'softmax1' | 'sink'
  m.alpha = -1.0                   # > 0: gamma = -alpha / softmax_T (overrides the gamma of `softmax`)
  m.softmax_T = 128                # fixed constant T of the alpha form (BERT: max_seq_length, OPT: block_size)
  m.gate = 'none'                  # none | unconditional_per_head | conditional_per_head | conditional_per_token | elementwise
  m.gate_mlp = False
  m.gate_linear_all_features = False
  m.gate_init = 0.5
  m.fine_tuning = False
  m.gate_last_init_std = -1.0     # fine_tuning: std of the gate's last Linear (-1: BERT 0.01 / OPT 0.001; 0: exact identity start)
  # Numerics.
  m.dtype = 'float32'              # compute dtype: 'float32' | 'bfloat16'
  # 'torch_default': attention (BERT q/k/v, OPT q/k/v/out_proj) and gate Linears start as
  # PyTorch's nn.Linear, U(+-1/sqrt(fan_in)) (the originals; configs/recipes.py sets it);
  # 'normal': N(0, init_std) weights, zero biases (HF's init).
  m.attention_init = 'normal'
  m.gate_mlp2 = False              # per-head gate Linear(d_head, d_head) -> ReLU -> Linear(d_head, 1)
  m.norm = 'layernorm'             # 'layernorm' | 'ssnorm' (single-scale RMSNorm, Outlier-Safe Pre-training)
  return m


def data_defaults() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = 'embedded'            # 'embedded' | 'bookcorpus_and_wiki' | 'wikitext-103' | 'wikitext-2' | 'hub' | 'files' | 'glue'
  d.hub_name = ''                  # source='hub': dataset name on the hub (or a local datasets dir)
  d.hub_config = ''
  d.text_column = 'text'
  d.files = ''                     # source='files': comma-separated files / folders of .txt
  d.glue_task = ''                 # source='glue': cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli
  d.tokenizer = ''                 # hub name or local dir; '' = train one on the corpus (cached in workdir)
  d.tokenizer_vocab_size = 2048    # when training a tokenizer
  d.max_seq_length = 128           # BERT sequence length
  d.block_size = 512               # OPT block size
  d.mlm_probability = 0.15
  d.validation_split_percentage = 5
  d.cache_dir = ''
  d.num_workers = 1
  # source='synthetic': the Bigram-Backcopy task (oqt_jax/data/synthetic.py), where small
  # models grow attention sinks / no-op heads (Guo et al., ICLR 2025).
  d.synthetic = ml_collections.ConfigDict(dict(
      vocab=64, seq_length=128, num_triggers=3, branching=4, trigger_prob=0.1, seed=0,
      num_eval_examples=1024))
  return d


def quant_defaults() -> ml_collections.ConfigDict:
  q = ml_collections.ConfigDict()
  q.n_bits = 8                     # weights
  q.n_bits_act = 8                 # activations
  q.qmethod = 'symmetric_uniform'          # weights
  q.qmethod_acts = 'asymmetric_uniform'    # activations
  q.ranges_weights = 'current_minmax'       # weights' range estimator ('mse' for OPT)
  q.ranges_acts = 'running_minmax'
  q.percentile = -1.0              # > 0: percentile estimator value (e.g. 99.999)
  q.momentum = 0.9
  q.est_num_batches = 16
  q.per_channel = False            # weights per output channel
  q.act_granularity = 'per_tensor' # activations: 'per_tensor' | 'per_embd' | 'per_token' (dynamic) | 'ngK' | 'ngpK'
  q.permute_shared_h = False       # PEG: x, h, y of a layer share h's permutation
  q.mse_search = 'grid'            # MSE / CE estimators: 'grid' | 'golden'
  q.num_candidates = 100           # MSE grid size
  q.quant_setup = 'all'             # ... | 'linear_inputs' (SmoothQuant) | 'matmul_inputs' (Outlier Suppression)
  q.symmetric_signed = False       # symmetric quantizers always on the signed grid (SmoothQuant)
  q.quant_dict = ml_collections.FieldReference('', field_type=object)  # "{'y': 16, 'h': 'ngp6'}" or a dict
  q.dynamic = False                # never freeze activation ranges
  q.int8 = False                   # run Linear layers as int8 matmuls (AQT)
  # AdaRound (eval.py --config.quant.adaround=True): per-layer learned rounding of the weights.
  q.adaround = False
  q.adaround_iters = 1000          # optimisation steps per layer
  q.adaround_samples = 1024        # calibration sequences per layer
  q.adaround_lambda = 0.01         # weight of the rounding regulariser
  q.adaround_beta = (20.0, 2.0)    # regulariser beta, annealed (cosine) start -> end
  q.adaround_warmup = 0.2          # fraction of iterations without the regulariser
  q.adaround_lr = 1e-3             # Adam learning rate of the rounding variables
  # QAT (train.py --config.quant.qat=True): train the quantized model (ranges from calibration).
  q.qat = False
  q.learn_ranges = 'none'          # 'none' (re-estimated every step) | 'fixed' | 'minmax' | 'lsq' | 'lsq+'
  # Quantization methods (oqt_jax/quant/methods; eval.py --quantize runs quant.method).
  q.method = ''                    # '' = plain calibration | 'outlier_suppression' | 'smoothquant' | ...
  q.twc_fine = True                # Token-Wise Clipping: LSQ+ fine stage after the ratio search
  q.twc_lr = 1e-5                  # its Adam learning rate (cosine schedule)
  q.twc_epochs = 3                 # its epochs over the calibration batches
  q.smoothquant_alpha = 0.5        # SmoothQuant migration strength
  q.weight_only = False            # --quantize: int8 weights (absmax per output channel), FP activations
  q.llm_int8_threshold = 6.0       # LLM.int8(): input dims with any |x| >= this run in floating point
  return q


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_defaults()
  c.data = data_defaults()
  c.quant = quant_defaults()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: all remaining devices

  c.seed = 1000
  c.num_train_steps = 1_000_000
  c.per_device_batch_size = 32
  c.global_batch_size = -1         # > 0: fixed global batch per micro-step whatever the device count
  c.eval_batch_size = 32
  c.num_eval_batches = 50
  c.gradient_accumulation_steps = 1
  c.learning_rate = 1e-4
  c.warmup_steps = 10_000
  c.lr_schedule = 'linear'         # 'linear' | 'cosine' | 'constant'
  c.optimizer = 'adamw'            # 'adamw' | 'muon' (Muon on the hidden weight matrices, AdamW on the rest)
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.weight_decay = 0.01
  c.decay_layer_norm = False       # OPT recipe: weight decay also on LayerNorm gamma
  c.max_grad_norm = 1.0
  c.compute_dtype = 'float32'      # training compute dtype ('bfloat16' on accelerators)
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 1000
  c.log_every_steps = 50
  c.export_hf = True               # write the final model as an HF checkpoint dir
  c.nonfinite = 'stop'             # non-finite loss / gradient: 'stop' (exit 2, nothing saved) | 'skip' (update skipped)
  c.max_skipped_steps = 10         # nonfinite='skip': stop after this many non-finite steps in a row
  # Fine-tuning (GLUE; configs/glue/*).
  c.init_from = ''                 # start from: HF dir / hub name, or a train.py workdir (hf/ or checkpoints/); '' = random init
  c.num_train_epochs = -1.0        # > 0: num_train_steps = epochs x ceil(train examples / batch), resolved at run time
  c.warmup_ratio = -1.0            # >= 0: warmup_steps = ratio x num_train_steps (resolved at run time)
  # 'lm' (the head's loss) | 'distill' (MSE of the final hidden states to the frozen init_from
  # checkpoint's, over non-padding tokens: converting a checkpoint into an attention variant)
  c.loss = 'lm'
  c.distill_mlm_weight = 0.0       # loss='distill' with an MLM head: + this x the masked tokens' CE
  return c
