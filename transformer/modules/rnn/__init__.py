"""Recurrent sequence-to-sequence: the information bottleneck, then Bahdanau and Luong attention."""

from transformer.modules.rnn.decoders import (
    DECODERS,
    LUONG_SCORES,
    BahdanauDecoder,
    BottleneckDecoder,
    LuongDecoder,
    attend,
)
from transformer.modules.rnn.encoder import CELLS, EncoderMemory, RNNEncoder
from transformer.modules.rnn.seq2seq import RNNSeq2Seq, build_rnn_seq2seq, shift_right
