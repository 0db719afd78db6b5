"""English-Spanish verse pairs from two public-domain Bibles, for translation.

Sources: Debian's `sword-text-kjv` (King James Version, module engKJV2006eb) and
`sword-text-sparv` (Reina-Valera 1909, module spaRV1909eb), SWORD zText modules that share the
KJV verse index (see sword.py). The Spanish module keeps its own verse numbering where it differs
(e.g. Job 38-41, Jonah 1-2): a verse left empty, with the next chapter shifted, or a verse whose
lengths disagree wildly. So a chapter is dropped when any of its verses is empty in either
language (and then the next chapter too), or when any verse's Spanish/English length ratio lies
outside [0.4, 2.5]; about 30,200 of 31,102 verses remain.

Splits: by the SHA-256 of the English text, 3% test, 3% validation, 94% train, so a verse text
that occurs several times (e.g. "And the LORD spake unto Moses, saying,") stays in one split.
A SentencePiece model (unigram, `vocab_size` pieces, ids 0-3 pad/BOS/EOS/UNK) is trained on the
training pairs (both languages) and saved with the data as `sentencepiece.model`.

The modules are looked for in: the builder's `sword_dir` argument (data config field
`sword_dir`), then $SWORD_PATH, then /usr/share/sword. Each may be a SWORD library root (holding
modules/texts/ztext/...) or a folder where the .deb files were unpacked (holding usr/share/sword).
"""

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from transformer.data import spec, sword, tokenizers

ENGLISH_MODULE = "engKJV2006eb"
SPANISH_MODULE = "spaRV1909eb"
DEFAULT_SWORD_DIR = "/usr/share/sword"
SPM_FILENAME = "sentencepiece.model"
LENGTH_RATIO_RANGE = (0.4, 2.5)

INSTALL_INSTRUCTIONS = f"""\
bible_en_es needs the Debian packages sword-text-kjv and sword-text-sparv. Either install them:
    apt-get update && apt-get install -y sword-text-kjv sword-text-sparv
(they land in {DEFAULT_SWORD_DIR}), or unpack them without installing and point to the folder:
    apt-get update && apt-get download sword-text-kjv sword-text-sparv
    for deb in sword-text-*.deb; do dpkg-deb -x "$deb" /path/to/sword_root; done
then set the data config field `sword_dir` (or the environment variable SWORD_PATH) to
/path/to/sword_root."""


def find_module_dirs(sword_dir: str | None = None) -> tuple[str, str]:
    """(English module folder, Spanish module folder); FileNotFoundError saying how to get them."""
    candidates = [d for d in (sword_dir, os.environ.get("SWORD_PATH"), DEFAULT_SWORD_DIR) if d]
    looked = []
    for root in candidates:
        for library in (root, os.path.join(root, "usr", "share", "sword")):
            ztext = os.path.join(library, "modules", "texts", "ztext")
            english, spanish = (os.path.join(ztext, m) for m in (ENGLISH_MODULE, SPANISH_MODULE))
            looked.append(ztext)
            if os.path.isfile(os.path.join(english, "ot.bzz")) and os.path.isfile(
                os.path.join(spanish, "ot.bzz")
            ):
                return english, spanish
    raise FileNotFoundError(
        f"SWORD modules {ENGLISH_MODULE} and {SPANISH_MODULE} not found in "
        f"{looked}.\n{INSTALL_INSTRUCTIONS}"
    )


def aligned_pairs(
    english: dict[str, str], spanish: dict[str, str], books=()
) -> list[tuple[str, str, str]]:
    """[(reference, English, Spanish)] in canonical order, misaligned chapters dropped."""
    chapters = {}
    for reference in english:
        book, chapter, _ = reference.split(".")
        if not books or book in books:
            chapters.setdefault((book, int(chapter)), []).append(reference)
    dropped = set()
    low, high = LENGTH_RATIO_RANGE
    for (book, chapter), references in chapters.items():
        if any(not english[r] or not spanish[r] for r in references):
            dropped |= {(book, chapter), (book, chapter + 1)}  # the next chapter is shifted
        elif any(not low <= len(spanish[r]) / len(english[r]) <= high for r in references):
            dropped.add((book, chapter))
    return [
        (r, english[r], spanish[r])
        for key, references in chapters.items()
        if key not in dropped
        for r in references
    ]


def split_of(english: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(english.encode()).digest()[:8], "little") % 100
    return "test" if bucket < 3 else "validation" if bucket < 6 else "train"


@dataclasses.dataclass
class BibleConfig(tfds.core.BuilderConfig):
    """`books`: OSIS ids to keep (empty: all 66). `vocab_size`: SentencePiece pieces."""

    books: tuple[str, ...] = ()
    vocab_size: int = 8000

    def validate(self):
        spec.check_int_fields("bible_en_es", self, {"vocab_size": 100})


class BibleEnEs(tfds.core.GeneratorBasedBuilder):
    """King James / Reina-Valera 1909 verse pairs, with a SentencePiece model."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        BibleConfig(name="verses", description="All 66 books, SentencePiece 8000."),
        BibleConfig(
            name="tiny",
            books=("Gen",),
            vocab_size=600,
            description="Genesis only, SentencePiece 600; for tests.",
        ),
    ]

    def __init__(self, *, sword_dir: str | None = None, **kwargs):
        self.sword_dir = sword_dir
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "reference": tfds.features.Text(),  # OSIS, e.g. 'Gen.1.1'
                    "en": tfds.features.Text(),
                    "es": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        english_dir, spanish_dir = find_module_dirs(self.sword_dir)
        pairs = aligned_pairs(
            sword.read_module(english_dir),
            sword.read_module(spanish_dir),
            self.builder_config.books,
        )
        by_split = {"train": [], "validation": [], "test": []}
        for pair in pairs:
            by_split[split_of(pair[1])].append(pair)
        training_text = [text for _, en, es in by_split["train"] for text in (en, es)]
        model = tokenizers.train_sentencepiece(training_text, self.builder_config.vocab_size)
        (self.data_path / SPM_FILENAME).write_bytes(model)
        return {split: self._generate_examples(examples) for split, examples in by_split.items()}

    def _generate_examples(self, pairs):
        for reference, english, spanish in pairs:
            yield reference, {"reference": reference, "en": english, "es": spanish}


def tokenizer(builder) -> tokenizers.SentencePieceTokenizer:
    """The SentencePiece model saved with a prepared builder's data."""
    return tokenizers.SentencePieceTokenizer(os.fspath(builder.data_path / SPM_FILENAME))


def make_encoder(builder, data_config):
    """Stored pair -> {"inputs": int32 [Ls], "targets": int32 [Lt]}, both ending with EOS.

    `data_config.source_language` ('en' or 'es') picks the direction.
    """
    spm = tokenizer(builder)
    source = data_config.source_language
    target = {"en": "es", "es": "en"}[source]
    eos = [tokenizers.EOS_ID]

    def encode(example):
        return {
            "inputs": np.concatenate([spm.encode(example[source].decode()), eos]).astype(np.int32),
            "targets": np.concatenate([spm.encode(example[target].decode()), eos]).astype(np.int32),
        }

    return encode


SPEC = spec.DatasetSpec(
    builder=BibleEnEs,
    task=spec.SEQ2SEQ,
    make_encoder=make_encoder,
    vocab_size=lambda c, data_config: c.vocab_size,
    max_length=lambda c: 256,
    max_target_length=lambda c: 256,
    pipeline_fields={"source_language": "en", "sword_dir": None},
    choices={"source_language": ("en", "es")},
)
