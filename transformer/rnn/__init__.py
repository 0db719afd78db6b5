"""Recurrent sequence-to-sequence: the information bottleneck, then Bahdanau and Luong attention."""

from transformer.rnn.decoders import (
    DECODERS,
    LUONG_SCORES,
    BahdanauDecoder,
    BottleneckDecoder,
    LuongDecoder,
    attend,
)
from transformer.rnn.encoder import CELLS, EncoderMemory, RNNEncoder
from transformer.rnn.seq2seq import RNNSeq2Seq, build_rnn_seq2seq, shift_right
