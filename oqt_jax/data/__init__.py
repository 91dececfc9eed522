"""Data: corpora, tokenizers, and reproducible MLM / CLM / GLUE batches.

    texts = load_texts(config.data, split)          # list[str] or datasets.Dataset('text')
    tok = get_tokenizer(config, workdir)            # PreTrainedTokenizerFast (trained + cached if
                                                    # config.data.tokenizer == '')
    ds = build_dataset(config, tok, split, workdir) # LMDataset (MLM / CLM) or GlueDataset
    batch = ds.batch(step, batch_size, process_index, process_count)
    for batch in ds.eval_batches(batch_size, num_batches): ...

Every batch is a pure function of (config.seed, step, process_index); see sampling.py and lm.py.
"""
from oqt_jax.data.glue import (GLUE_TASKS, GlueDataset, GlueTask, glue_metrics,
                               glue_task_info)
from oqt_jax.data.lm import IGNORE_INDEX, LMDataset, mlm_mask
from oqt_jax.data.pipeline import (build_dataset, check_tokenizer, get_tokenizer, lm_kind,
                                   seq_len_field, validate_data_config)
from oqt_jax.data.sources import SOURCES, embedded_documents, load_texts
from oqt_jax.data.tokenizer import (BERT_SPECIAL_TOKENS, OPT_SPECIAL_TOKENS,
                                    tokenizer_fingerprint, train_tokenizer)

__all__ = [
    'BERT_SPECIAL_TOKENS', 'GLUE_TASKS', 'GlueDataset', 'GlueTask', 'IGNORE_INDEX',
    'LMDataset', 'OPT_SPECIAL_TOKENS', 'SOURCES', 'build_dataset', 'check_tokenizer',
    'embedded_documents', 'get_tokenizer', 'glue_metrics', 'glue_task_info', 'lm_kind',
    'load_texts', 'mlm_mask', 'seq_len_field', 'tokenizer_fingerprint', 'train_tokenizer',
    'validate_data_config',
]
