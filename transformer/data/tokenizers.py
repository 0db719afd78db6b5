"""Token ids shared by every data set: reserved ids, bytes, and SentencePiece.

Every vocabulary starts with the four reserved ids of `transformer.token_ids` (PAD 0, BOS 1,
EOS 2, CLS 3), so padding is 0 everywhere. Byte-level data sets map byte b to id b + 4, so their
vocabulary has 260 ids.
"""

import io

import numpy as np

from transformer.token_ids import BOS_ID, CLS_ID, EOS_ID, PAD_ID  # noqa: F401 (re-exported)

NUM_RESERVED = 4
BYTE_VOCAB_SIZE = NUM_RESERVED + 256


def encode_bytes(data: bytes) -> np.ndarray:
    """UTF-8 (or any) bytes -> int32 ids in [4, 260), shape [len(data)]."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + NUM_RESERVED


def train_sentencepiece(sentences, vocab_size: int) -> bytes:
    """Trains a unigram SentencePiece model; returns the serialised model.

    Ids 0-3 are pad, BOS, EOS and UNK, so padding is 0 as in every other vocabulary here.
    Training is deterministic for a given sentence list (one thread, no sampling).
    """
    import sentencepiece as spm  # Only translation needs it; keep `import transformer.data` light.

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=CLS_ID,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


class SentencePieceTokenizer:
    """Text <-> int32 ids with a serialised SentencePiece model, loaded lazily.

    Lazy loading keeps the object picklable, so grain worker processes can receive it.
    """

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._processor = None

    def __getstate__(self):
        return {"model_path": self.model_path, "_processor": None}

    @property
    def processor(self):
        if self._processor is None:
            import sentencepiece as spm  # pylint: disable=g-import-not-at-top

            with open(self.model_path, "rb") as f:
                self._processor = spm.SentencePieceProcessor(model_proto=f.read())
        return self._processor

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids, shape [num_pieces] (no BOS/EOS added)."""
        return np.asarray(self.processor.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids) if i > EOS_ID]
        return self.processor.decode(ids)
