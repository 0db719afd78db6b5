"""Data sets and pipelines: every builder prepares a small config and reads back through grain.

bible_en_es needs the Debian packages sword-text-kjv and sword-text-sparv (installed, or unpacked
under $SWORD_PATH); without them its tests fail with the install command, they do not skip.
"""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from transformer import data
from transformer.data import (
    associative_recall,
    bible_en_es,
    listops,
    pipeline,
    registry,
    sword,
    tokenizers,
)

tfds.disable_progress_bar()

SMALL_CONFIGS = {
    "listops": dict(name="listops", config="tiny"),
    "associative_recall": dict(name="associative_recall", config="tiny"),
    "copy_reverse": dict(name="copy_reverse", config="tiny"),
    "shakespeare": dict(name="shakespeare", max_length=64),
    "bible_en_es": dict(name="bible_en_es", config="tiny", max_length=48, max_target_length=48),
    "bbc_news": dict(name="bbc_news", max_length=512),
}
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def read_split(data_config, split, data_dir):
    """Every stored example of a split, through tfds.data_source."""
    source = data.prepare(data_config, data_dir).as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def fingerprint(example) -> bytes:
    """The stored content of an example (what must not repeat across splits)."""
    parts = []
    for key in sorted(example):
        value = example[key]
        if key in ("name", "play", "reference"):
            continue  # identifiers; the content is what must differ
        parts.append(value if isinstance(value, bytes) else np.asarray(value).tobytes())
    return hashlib.sha256(b"\0".join(parts)).digest()


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_builder_prepares_and_reads_back_through_grain(name, data_dir):
    config = SMALL_CONFIGS[name]
    info = data.data_info(config)
    it = data.make_iterator(config, "train", global_batch_size=4, seed=0, data_dir=data_dir)
    for _ in range(3):
        batch = next(it)
        assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
        assert batch["inputs"].shape[0] == 4 and batch["inputs"].shape[1] <= info.max_length
        assert 0 <= batch["inputs"].min() and batch["inputs"].max() < info.vocab_size
        assert batch["inputs"][:, 0].min() > 0  # no row of a training batch is padding
        if info.task == "classification":
            assert batch["targets"].shape == (4,)
            assert 0 <= batch["targets"].min() and batch["targets"].max() < info.num_classes
            assert (batch["inputs"][:, 0] == tokenizers.CLS_ID).all()
        elif info.task == "language_modelling":
            assert batch["targets"].shape == batch["inputs"].shape == (4, info.max_length)
            assert (batch["targets"][:, :-1] == batch["inputs"][:, 1:]).all()  # next tokens
        else:
            assert batch["targets"].shape[1] <= info.max_target_length
            assert 0 <= batch["targets"].min() and batch["targets"].max() < info.vocab_size
            lengths = (batch["targets"] > 0).sum(1)
            assert (batch["targets"][np.arange(4), lengths - 1] == tokenizers.EOS_ID).all() or (
                lengths == batch["targets"].shape[1]
            ).any()  # ends with EOS unless cut


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_no_example_of_one_split_appears_in_another(name, data_dir):
    seen = {}
    for split in SPLITS:
        keys = [fingerprint(e) for e in read_split(SMALL_CONFIGS[name], split, data_dir)]
        assert keys, f"{name} {split} is empty"
        for other, other_keys in seen.items():
            assert not set(keys) & other_keys, f"{name}: {split} shares examples with {other}"
        seen[split] = set(keys)
    if name == "bible_en_es":  # a source text repeated in the Bible stays in one split
        english = {
            s: {e["en"] for e in read_split(SMALL_CONFIGS[name], s, data_dir)} for s in SPLITS
        }
        assert not english["train"] & (english["validation"] | english["test"])


@pytest.mark.parametrize("name", ["listops", "associative_recall", "copy_reverse"])
def test_generation_is_deterministic_from_the_seed(name, tmp_path):
    config = SMALL_CONFIGS[name]
    first = [fingerprint(e) for e in read_split(config, "test", str(tmp_path / "a"))]
    again = [fingerprint(e) for e in read_split(config, "test", str(tmp_path / "b"))]
    assert first == again
    reseeded = dict(config, builder_overrides=dict(seed=1))
    other = [fingerprint(e) for e in read_split(reseeded, "test", str(tmp_path / "a"))]
    assert set(first) != set(other)


def evaluate_listops(tokens: list[str]) -> int:
    """Evaluates a ListOps expression with an explicit stack (independent of the generator)."""
    stack = []  # frames: [operator, arguments]
    result = None
    for token in tokens:
        if token.startswith("["):
            stack.append([token, []])
            continue
        if token == "]":
            operator, arguments = stack.pop()
            value = {
                "[MIN": min(arguments),
                "[MAX": max(arguments),
                "[MED": int(np.floor(np.median(arguments))),
                "[SM": sum(arguments) % 10,
            }[operator]
        else:
            value = int(token)
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    assert not stack
    return result


def test_listops_label_is_the_value_of_its_expression(data_dir):
    config = registry.builder_config(SMALL_CONFIGS["listops"])
    examples = read_split(SMALL_CONFIGS["listops"], "train", data_dir)
    depths = []
    for example in examples:
        tokens = example["expression"].decode().split()
        assert config.min_length < len(tokens) < config.max_length
        assert example["label"] == evaluate_listops(tokens)
        depth = max(np.cumsum([t.startswith("[") - (t == "]") for t in tokens]))
        assert depth <= config.max_depth
        depths.append(depth)
    assert max(depths) >= 3  # nesting really happens
    assert len({e["label"] for e in examples}) == 10


def test_listops_tokens_survive_the_pipeline(data_dir):
    batch = next(
        data.make_iterator(
            SMALL_CONFIGS["listops"],
            "test",
            global_batch_size=8,
            seed=0,
            num_epochs=1,
            data_dir=data_dir,
        )
    )
    for row, label in zip(batch["inputs"], batch["targets"]):
        tokens = [listops.TOKENS[i] for i in row[1:] if i != tokenizers.PAD_ID]
        assert evaluate_listops(tokens) == label


@pytest.mark.parametrize("distance", [2, 8, 16])
def test_associative_recall_places_the_pair_at_the_requested_distance(distance, data_dir):
    config = dict(
        name="associative_recall", config="tiny", builder_overrides=dict(distance=distance)
    )
    builder_config = registry.builder_config(config)
    first_value = associative_recall.first_value_id(builder_config)
    for example in read_split(config, "train", data_dir):
        tokens = list(example["tokens"])
        keys = tokens[0:-1:2]
        assert len(set(keys)) == len(keys) and max(keys) < first_value <= min(tokens[1::2])
        query_position = len(tokens) - 1
        key_position = keys.index(tokens[-1]) * 2
        assert query_position - key_position == distance
        assert tokens[key_position + 1] - first_value == example["label"]


@pytest.mark.parametrize("distance", [1, 5, 23, 0])
def test_spread_recall_puts_one_pair_token_per_key_in_filler(distance, data_dir):
    """length > 0: pair tokens (key-major ids) among filler, the query last; the queried pair
    `distance` before it, or at any distance when 0 (and then at several across examples)."""
    overrides = dict(length=24, num_pairs=3, num_keys=4, num_values=3, distance=distance)
    overrides.update(num_train=60, num_validation=8, num_test=8)
    config = dict(name="associative_recall", config="tiny", builder_overrides=overrides)
    c = registry.builder_config(config)
    first_pair, filler = associative_recall.first_pair_id(c), associative_recall.filler_id(c)
    assert filler == first_pair + 4 * 3
    distances = set()
    for example in read_split(config, "train", data_dir):
        tokens = np.asarray(example["tokens"])
        assert len(tokens) == 24 and (tokens[:-1] != filler).sum() == 3
        pairs = {
            i: divmod(int(t) - first_pair, 3) for i, t in enumerate(tokens[:-1]) if t != filler
        }
        assert len({key for key, _ in pairs.values()}) == 3  # distinct keys
        query_key = int(tokens[-1]) - tokenizers.NUM_RESERVED
        (position,) = [i for i, (key, _) in pairs.items() if key == query_key]
        assert pairs[position][1] == example["label"]
        distances.add(23 - position)
    assert distances == {distance} if distance else len(distances) > 5


def test_translation_pairs_stay_aligned(data_dir):
    pairs = {}
    for split in SPLITS:
        for example in read_split(SMALL_CONFIGS["bible_en_es"], split, data_dir):
            pairs[example["reference"].decode()] = (example["en"].decode(), example["es"].decode())
    assert pairs["Gen.1.1"] == (
        "In the beginning God created the heaven and the earth.",
        "EN el principio crió Dios los cielos y la tierra.",
    )
    assert pairs["Gen.1.3"] == (
        "And God said, Let there be light: and there was light.",
        "Y dijo Dios: Sea la luz: y fué la luz.",
    )
    assert pairs["Gen.50.26"][0].startswith("So Joseph died")
    assert pairs["Gen.50.26"][1].startswith("Y murió José")
    assert len(pairs) > 1400 and all(en and es for en, es in pairs.values())


def test_translation_pipeline_decodes_to_the_verse(data_dir):
    builder = data.prepare(SMALL_CONFIGS["bible_en_es"], data_dir)
    spm = bible_en_es.tokenizer(builder)
    assert spm.vocab_size == 600
    for batch in data.make_iterator(
        SMALL_CONFIGS["bible_en_es"],
        "train",
        global_batch_size=64,
        seed=0,
        num_epochs=1,
        shuffle=False,
        data_dir=data_dir,
    ):
        for inputs, targets in zip(batch["inputs"], batch["targets"]):
            if spm.decode(inputs).startswith("In the beginning God created"):
                assert spm.decode(targets) == "EN el principio crió Dios los cielos y la tierra."
                return
    raise AssertionError("Gen.1.1 not found in the train split")  # it is there by its hash


def test_whole_bible_reads_and_aligns():
    english_dir, spanish_dir = bible_en_es.find_module_dirs()
    english, spanish = sword.read_module(english_dir), sword.read_module(spanish_dir)
    assert len(english) == len(spanish) == 31102
    assert english["Rev.22.21"] == "The grace of our Lord Jesus Christ be with you all. Amen."
    pairs = bible_en_es.aligned_pairs(english, spanish)
    assert 30_000 < len(pairs) < 31_102
    references = {r for r, _, _ in pairs}
    assert "Job.39.1" not in references  # the Spanish numbering is shifted there
    assert "John.3.16" in references


def test_missing_bible_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SWORD_PATH", str(tmp_path))
    monkeypatch.setattr(bible_en_es, "DEFAULT_SWORD_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get download sword-text-kjv sword-text-sparv"):
        bible_en_es.find_module_dirs(str(tmp_path))


def test_osis_markup_is_stripped():
    osis = (
        '<w lemma="strong:H0430">God</w> <transChange type="added">was</transChange> good.'
        '<note placement="foot"><reference>1.4 </reference>Heb. between</note> <l sID="x"/>'
        '<title type="main">Heading</title>\u00b6 And &amp; so'
    )
    assert sword.osis_to_text(osis) == "God was good. And & so"


def test_iterator_state_restores_the_exact_position(data_dir):
    config = dict(SMALL_CONFIGS["copy_reverse"], sort_window=3)
    it = data.make_iterator(config, "train", global_batch_size=4, seed=3, data_dir=data_dir)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    restored = data.make_iterator(config, "train", global_batch_size=4, seed=3, data_dir=data_dir)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert all((got[k] == want[k]).all() for k in want)


def test_each_epoch_is_shuffled_differently_and_reproducibly(data_dir):
    config = SMALL_CONFIGS["associative_recall"]

    def epochs(seed):
        it = data.make_iterator(
            config, "train", global_batch_size=200, seed=seed, num_epochs=2, data_dir=data_dir
        )
        return [next(it)["inputs"] for _ in range(2)]

    first, second = epochs(0)
    assert sorted(map(bytes, first)) == sorted(map(bytes, second))  # the same examples
    assert not (first == second).all()  # in another order
    assert all((a == b).all() for a, b in zip(epochs(0), (first, second)))
    assert not (epochs(1)[0] == first).all()


def test_hosts_read_disjoint_shards_with_equal_batch_counts(data_dir):
    config = SMALL_CONFIGS["listops"]  # 100 test examples over 3 hosts: 34, 33, 33
    per_host = []
    for host in range(3):
        batches = list(
            data.make_iterator(
                config,
                "test",
                global_batch_size=24,
                seed=0,
                process_index=host,
                process_count=3,
                num_epochs=1,
                data_dir=data_dir,
            )
        )
        rows = [
            row.tobytes() for b in batches for row, t in zip(b["inputs"], b["targets"]) if t >= 0
        ]
        per_host.append((len(batches), rows))
    assert len({count for count, _ in per_host}) == 1
    all_rows = [row for _, rows in per_host for row in rows]
    assert len(all_rows) == len(set(all_rows)) == 100


def test_length_buckets_and_sorting_bound_the_padding(data_dir):
    config = dict(SMALL_CONFIGS["copy_reverse"], length_buckets=(6, 10), sort_window=4)
    it = data.make_iterator(config, "train", global_batch_size=8, seed=0, data_dir=data_dir)
    shapes = set()
    for _ in range(20):
        batch = next(it)
        longest = (batch["inputs"] > 0).sum(1).max()
        length = batch["inputs"].shape[1]
        assert length in (6, 10, 13) and longest <= length
        assert length == min(b for b in (6, 10, 13) if b >= longest)
        shapes.add(length)
    assert len(shapes) > 1


def test_bad_configs_fail_with_the_allowed_values(data_dir):
    with pytest.raises(ValueError, match="allowed: .*'listops'"):
        data.data_info(dict(name="lisops"))
    with pytest.raises(ValueError, match="allowed: .*'tiny'"):
        data.data_info(dict(name="listops", config="huge"))
    with pytest.raises(ValueError, match="Unknown data config fields \\['max_len'\\]"):
        data.data_info(dict(name="listops", max_len=10))
    with pytest.raises(ValueError, match="allowed: .*'distance'"):
        data.data_info(dict(name="associative_recall", builder_overrides=dict(distanse=4)))
    with pytest.raises(ValueError, match="distance must be even"):
        data.data_info(dict(name="associative_recall", builder_overrides=dict(distance=3)))
    spread = dict(length=16, num_pairs=4, num_keys=4, num_values=2)
    with pytest.raises(ValueError, match=r"distance must be in \[1, length - 1\] = \[1, 15\]"):
        data.data_info(dict(name="associative_recall", builder_overrides=dict(spread, distance=16)))
    with pytest.raises(ValueError, match="length=4 cannot hold num_pairs=4 pair tokens"):
        data.data_info(dict(name="associative_recall", builder_overrides=dict(spread, length=4)))
    with pytest.raises(ValueError, match="source_language"):
        data.data_info(dict(name="bible_en_es", source_language="fr"))
    with pytest.raises(ValueError, match="multiple of process_count 3"):
        data.make_iterator(
            SMALL_CONFIGS["listops"],
            "train",
            global_batch_size=8,
            seed=0,
            process_count=3,
            data_dir=data_dir,
        )
    with pytest.raises(ValueError, match="allowed: \\['test', 'train', 'validation'\\]"):
        data.make_iterator(
            SMALL_CONFIGS["listops"], "dev", global_batch_size=8, seed=0, data_dir=data_dir
        )


def test_data_info_gives_model_sizes():
    assert data.data_info(dict(name="listops")) == data.DataInfo(
        task="classification",
        vocab_size=19,
        num_classes=10,
        max_length=2001,
        max_target_length=None,
    )
    recall = data.data_info(dict(name="associative_recall", config="pairs512"))
    assert (recall.vocab_size, recall.num_classes, recall.max_length) == (4 + 1024 + 16, 16, 1026)
    assert data.data_info(dict(name="shakespeare")).vocab_size == 260
    assert data.data_info(dict(name="bible_en_es")).vocab_size == 8000


@pytest.mark.parametrize("readers", [dict(worker_count=1), dict(read_threads=2)])
def test_reading_ahead_yields_the_same_batches(data_dir, readers):
    config = SMALL_CONFIGS["listops"]
    on_demand = data.make_iterator(config, "train", global_batch_size=4, seed=0, data_dir=data_dir)
    ahead = data.make_iterator(
        dict(config, **readers), "train", global_batch_size=4, seed=0, data_dir=data_dir
    )
    for _ in range(5):
        want, got = next(on_demand), next(ahead)
        assert all((got[k] == want[k]).all() for k in want)
    ahead.close()


@pytest.mark.parametrize("field", ["worker_count", "read_threads"])
def test_negative_reader_counts_are_refused(data_dir, field):
    with pytest.raises(ValueError, match=f"{field} must be >= 0"):
        data.make_iterator(
            dict(SMALL_CONFIGS["listops"], **{field: -1}),
            "train",
            global_batch_size=4,
            seed=0,
            data_dir=data_dir,
        )


def test_packed_windows_keep_documents_apart():
    windows = pipeline.PackedWindows([[10, 11, 12], [20], [30, 31, 32, 33, 34, 35]], 5)
    bos, eos = tokenizers.BOS_ID, tokenizers.EOS_ID
    assert len(windows) == 2  # 13 pairs: the last 3 do not fill a window
    expected = [
        dict(
            inputs=[bos, 10, 11, 12, bos],
            targets=[10, 11, 12, eos, 20],
            segment_ids=[1, 1, 1, 1, 2],
            positions=[0, 1, 2, 3, 0],
        ),
        # The second document was cut at the window's edge: its piece is a segment of its own.
        dict(
            inputs=[20, bos, 30, 31, 32],
            targets=[eos, 30, 31, 32, 33],
            segment_ids=[1, 2, 2, 2, 2],
            positions=[0, 0, 1, 2, 3],
        ),
    ]
    for index, want in enumerate(expected):
        got = windows[index]
        assert {key: got[key].tolist() for key in want} == want


def _check_packed_row(row):
    """One packed row's invariants: segments 1, 2, ...; positions restart with each; every
    target is the next input of its own segment or ends its document with EOS."""
    inputs, targets, segments, positions = (
        row[k] for k in ("inputs", "targets", "segment_ids", "positions")
    )
    starts = np.concatenate([[True], segments[1:] != segments[:-1]])
    assert segments[0] == 1 and set(np.diff(segments)) <= {0, 1}
    assert (positions[starts] == 0).all() and (np.diff(positions)[~starts[1:]] == 1).all()
    inside = ~starts[1:]
    assert (targets[:-1][inside] == inputs[1:][inside]).all()
    new_document = starts[1:] & (inputs[1:] == tokenizers.BOS_ID)
    assert (targets[:-1][new_document] == tokenizers.EOS_ID).all()
    return int(new_document.sum())


def test_packed_language_modelling_batches_carry_segments_and_positions(data_dir):
    config = dict(SMALL_CONFIGS["shakespeare"], pack_documents=True)
    unpacked = dict(SMALL_CONFIGS["shakespeare"])
    it = data.make_iterator(
        config,
        "validation",
        global_batch_size=64,
        seed=0,
        num_epochs=1,
        shuffle=False,
        drop_remainder=True,
        data_dir=data_dir,
    )
    batches = list(it)
    boundaries = 0
    for batch in batches:
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}
        for i in range(len(batch["inputs"])):
            boundaries += _check_packed_row({k: v[i] for k, v in batch.items()})
    plays = len(read_split(unpacked, "validation", data_dir))
    assert plays >= 2 and boundaries >= 1
    # The targets, window after window, are the documents each followed by EOS.
    documents = [
        np.append(tokenizers.encode_bytes(example["text"]), tokenizers.EOS_ID)
        for example in read_split(unpacked, "validation", data_dir)
    ]
    stream = np.concatenate(documents)
    targets = np.concatenate([batch["targets"].reshape(-1) for batch in batches])
    np.testing.assert_array_equal(targets, stream[: len(targets)])
    plain = next(
        data.make_iterator(unpacked, "validation", global_batch_size=8, seed=0, data_dir=data_dir)
    )
    assert set(plain) == {"inputs", "targets"}
    with pytest.raises(ValueError, match="pack_documents"):
        data.data_info(dict(unpacked, pack_documents="yes"))
    with pytest.raises(ValueError, match="Unknown data config fields \\['pack_documents'\\]"):
        data.data_info(dict(SMALL_CONFIGS["listops"], pack_documents=True))
