"""Text generation from an evaluated OPT model (eval.py --prompt): the run's model and
tokenizer, optionally calibrated first, greedy or sampled decoding with the KV cache."""
from __future__ import annotations

from typing import Optional

import ml_collections
import numpy as np

from oqt_jax import data, models, quant
from oqt_jax.errors import ConfigError, DataError
from oqt_jax.evaluate.setup import (calibration_batches, datasets, eval_config, info, load_model,
                                    plural, run_tokenizer, sync_config)
from oqt_jax.models.generate import check_generation


def generate_text(config: Optional[ml_collections.ConfigDict], workdir: Optional[str],
                  prompt: str, *, hf_model: Optional[str] = None, max_new_tokens: int = 20,
                  temperature: float = 0.0, top_k: int = 0, quantize: bool = False,
                  progress: bool = True, seed: Optional[int] = None) -> str:
  """Continues `prompt` with the run's OPT model (and tokenizer); prints the prompt, the
  continuation and why it stopped (end-of-sequence token or max_new_tokens) and returns the
  continuation. quantize: the model calibrated with config.quant generates. seed: the
  sampling seed (default config.seed). Every setting is checked before any work."""
  if config is None:
    config = eval_config(None, workdir, hf_model)
  qcfg = quant.resolved(config) if quantize else None   # validated here, once
  model, variables, source = load_model(config, workdir, hf_model)
  config = sync_config(config, model, source)
  config = run_tokenizer(config, workdir)
  if model.cfg.model_type != 'opt' or model.cfg.resolved_head != 'clm':
    raise ConfigError(f'--prompt: text generation needs an OPT causal-LM model, {source} is '
                      f'{model.cfg.model_type} ({model.cfg.resolved_head} head)')
  tok = data.get_tokenizer(config, workdir)
  ids = list(tok(prompt)['input_ids'])
  if not ids:
    raise ConfigError(f'--prompt={prompt!r}: no tokens')
  bad = [i for i in ids if not 0 <= i < model.cfg.vocab_size]
  if bad:
    raise DataError(f'--prompt: token id {bad[0]} of the tokenizer is beyond the model\'s '
                    f'embedding table (vocab_size={model.cfg.vocab_size}): the tokenizer does '
                    'not belong to this model')
  check_generation(model, len(ids), max_new_tokens, temperature, top_k)
  seed = int(config.get('seed', 0) if seed is None else seed)
  if quantize:
    _, cal = datasets(config, workdir, calib=True)
    bs = int(config.get('eval_batch_size', 32))
    model, variables = quant.calibrate(
        model, variables, calibration_batches(cal, bs, int(qcfg.est_num_batches)), qcfg,
        progress=progress)
  info(f'generating up to {plural(int(max_new_tokens), "token")} with '
        f'{"the quantized " if quantize else "the "}model from {source} '
        f'({"greedy" if temperature == 0 else f"T={temperature}, seed {seed}"}'
        f'{f", top_k={top_k}" if top_k else ""})')
  out = models.generate(model, variables, np.asarray([ids], np.int32), max_new_tokens,
                        temperature=temperature, top_k=top_k, seed=seed,
                        eos_token_id=tok.eos_token_id)
  new = [int(i) for i in np.asarray(out)[0, len(ids):]]
  if tok.eos_token_id is not None and tok.eos_token_id in new:
    new = new[:new.index(tok.eos_token_id)]
    why = f'end-of-sequence token after {plural(len(new), "token")}'
  else:
    why = f'length: {plural(len(new), "new token")} (--max_new_tokens)'
  text = tok.decode(new, skip_special_tokens=True)
  print(f'prompt:       {prompt}\ncontinuation: {text}\nstopped:      {why}', flush=True)
  return text
