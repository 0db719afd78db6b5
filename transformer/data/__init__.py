"""Data sets as TFDS builders (array_record, no TensorFlow) and grain pipelines over them.

    from transformer import data
    info = data.data_info(config.data)      # vocab_size, num_classes, lengths: for the model
    it = data.make_iterator(config.data, "train", global_batch_size=64, seed=0,
                            process_index=jax.process_index(), process_count=jax.process_count())

Data sets (TFDS builder names): listops, associative_recall, copy_reverse, shakespeare,
bible_en_es, bbc_news. See registry.py for data config fields and pipeline.py for batches.
"""

from transformer.data.pipeline import make_dataset, make_iterator
from transformer.data.registry import (
    DATASETS,
    DataInfo,
    builder_config,
    data_info,
    make_builder,
    prepare,
    resolve,
    with_overrides,
)
from transformer.data.tokenizers import BOS_ID, CLS_ID, EOS_ID, PAD_ID
