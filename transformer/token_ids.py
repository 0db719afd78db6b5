"""The reserved token ids every vocabulary and every model here agree on.

    PAD_ID = 0   padding: never attended to, never pooled, never counted by a loss
    BOS_ID = 1   beginning of sequence: the start token of every decoder
    EOS_ID = 2   end of sequence
    CLS_ID = 3   classification token (UNK in SentencePiece vocabularies)

A module of its own so that the models import them without importing the data pipeline (TFDS,
grain); transformer/data/tokenizers.py imports them from here.
"""

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
CLS_ID = 3
