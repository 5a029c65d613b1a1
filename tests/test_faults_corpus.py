"""Corrupted corpus and index files (issue 20, item 2): each stops the load with an error that
names the file (and the line or row where there is one), never a bare decode error, a crash or
a silently wrong passage."""
import json
import re
import shutil

import numpy as np
import pytest

from searcher_jax.retrieval import corpus_formats, corpus_store
from searcher_jax.retrieval.bm25 import BM25Index
from searcher_jax.retrieval.dense_index import DenseIndex, IndexConfig
from searcher_jax.retrieval.passage import Passage

PASSAGES = [Passage(str(i), f"Title {i}", f"passage number {i} about topic {i % 5} é", "hotpot_abstract")
            for i in range(50)]


@pytest.mark.parametrize("name, content, message", [
    ("bad.tsv", b"0\tTitle: A Text: a\n1\tTitle: B Text: \xff\xfeb\n",
     r"bad\.tsv:2: not UTF-8 \(byte 0xff at character 18\)"),
    ("bad.tsv", b"0\tTitle: A Text: a\n1\ttext\tTitle\n",  # DPR's id, text, title columns
     r"bad\.tsv:2: expected `id<TAB>passage` \(2 tab-separated fields\), found 3"),
    ("bad.jsonl", b'{"id": "1", "title": "t", "text": "x"}\n{"id": "2", "title": "t", "te',
     r"bad\.jsonl:2: invalid JSON"),  # truncated mid-line
    ("bad.jsonl", b'{"id": "1", "title": "t", "text": "x"}\n\x00\x9c\x8f\x10garbage\n',
     r"bad\.jsonl:2: not UTF-8 \(byte 0x9c"),
    ("bad.jsonl", b'{"id": "1", "title": "t", "text": "broken \\ud800 escape"}\n',
     r"bad\.jsonl:1: field 'text' holds a lone surrogate"),
    ("bad.jsonl", b'{"id": ["1"], "title": "t", "text": "x"}\n',
     r"bad\.jsonl:1: field 'id' must be a string or an integer, got list"),
])
def test_a_corrupted_corpus_file_names_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(corpus_formats.CorpusFormatError, match=message):
        list(corpus_formats.read_corpus(path))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("store")
    corpus_store.write_store(iter(PASSAGES), directory, progress=False)
    return directory


def _damaged_copy(store_dir, tmp_path, damage):
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    damage(copy)
    return copy


def _as_int32(path):
    """Offsets written as int32: the right count, the wrong dtype."""
    path.write_bytes(np.fromfile(path, np.int64).astype(np.int32).tobytes())


def _truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


@pytest.mark.parametrize("damage, error, message", [
    (lambda d: (d / "meta.json").write_text('{"num_passages": 50,'), corpus_store.CorpusStoreError,
     r"meta\.json: not valid JSON"),
    (lambda d: (d / "meta.json").write_text('{"num_passages": "50", "formats": []}'),
     corpus_store.CorpusStoreError, r"meta\.json: expected .*num_passages"),
    (lambda d: _truncate(d / "text.offsets"), corpus_store.CorpusStoreError,
     r"text\.offsets: 204 bytes, expected 408 \(int64 \[num_passages \+ 1\] = \[51\]"),
    (lambda d: _as_int32(d / "title.offsets"), corpus_store.CorpusStoreError,
     r"title\.offsets: 204 bytes, expected 408"),
    (lambda d: _truncate(d / "text.bin", 0.9), corpus_store.CorpusStoreError,
     r"text\.offsets: the offsets run from 0 to \d+, but .*text\.bin holds \d+ bytes"),
    (lambda d: (d / "format.codes").unlink(), FileNotFoundError,
     r"format\.codes not found: the corpus store in .* is incomplete"),
    (lambda d: (d / "format.codes").write_bytes(bytes([0] * 49 + [9])),
     corpus_store.CorpusStoreError, r"format\.codes: row 49 has format code 9"),
])
def test_a_corrupted_corpus_store_fails_at_open_naming_the_file(store_dir, tmp_path, damage,
                                                                 error, message):
    with pytest.raises(error, match=message):
        corpus_store.CorpusStore(_damaged_copy(store_dir, tmp_path, damage))


def _garble_row(directory, row: int):
    """Overwrites row `row`'s text bytes with bytes that are not UTF-8 (the size unchanged)."""
    offsets = np.fromfile(directory / "text.offsets", np.int64)
    data = bytearray((directory / "text.bin").read_bytes())
    data[offsets[row]:offsets[row + 1]] = b"\xff" * int(offsets[row + 1] - offsets[row])
    (directory / "text.bin").write_bytes(bytes(data))


def _swap_offsets(directory, row: int):
    offsets = np.fromfile(directory / "id.offsets", np.int64)
    offsets[[row, row + 1]] = offsets[[row + 1, row]]
    offsets.tofile(directory / "id.offsets")


@pytest.mark.parametrize("damage, message", [
    (lambda d: _garble_row(d, 7), r"text\.bin: row 7 is not UTF-8"),
    (lambda d: _swap_offsets(d, 12), r"id\.offsets: row 12 spans bytes \[\d+, \d+\)"),
])
def test_a_damaged_row_names_the_file_and_row_when_read(store_dir, tmp_path, damage, message):
    store = corpus_store.CorpusStore(_damaged_copy(store_dir, tmp_path, damage))
    assert store.get(0) == PASSAGES[0]  # the other rows still read
    with pytest.raises(corpus_store.CorpusStoreError, match=message):
        list(store)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dense")
    vectors = np.random.default_rng(0).normal(size=(len(PASSAGES), 8)).astype(np.float32)
    DenseIndex.build(vectors, IndexConfig(kind="brute_force")).save(directory)
    return directory


def _rewrite_npy(path, change):
    np.save(path, change(np.load(path)))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "dense_index.json").write_text("{garbage"), r"dense_index\.json: not valid JSON"),
    (lambda d: (d / "dense_index.json").write_text('{"num_passages": 50}'),
     r"dense_index\.json: expected the keys"),
    (lambda d: _truncate(d / "dataset.npy"), r"dataset\.npy: not a readable \.npy file"),
    (lambda d: (d / "dataset.npy").write_bytes(b"\x07" * 1728), r"dataset\.npy: not a readable"),
    (lambda d: _rewrite_npy(d / "dataset.npy", lambda x: x[:40]),
     r"dataset\.npy: float32 \[50, 8\] expected .*found float32 \[40, 8\]"),
    (lambda d: _rewrite_npy(d / "dataset.npy", lambda x: x.astype(np.float64)),
     r"dataset\.npy: float32 \[50, 8\] expected .*found float64 \[50, 8\]"),
    (lambda d: (d / "scann_config.pb").write_bytes(b"\xff\x13garbage"),
     r"ScaNN cannot load the index .*scann_config\.pb"),
])
def test_a_corrupted_dense_index_fails_at_load_naming_the_file(dense_dir, tmp_path, damage,
                                                                message):
    copy = tmp_path / "dense"
    shutil.copytree(dense_dir, copy)
    damage(copy)
    with pytest.raises(ValueError, match=message) as error:
        DenseIndex.load(copy)
    assert str(copy) in str(error.value)


def test_a_dense_index_of_another_corpus_is_refused(dense_dir):
    assert DenseIndex.load(dense_dir, len(PASSAGES)).num_passages == len(PASSAGES)
    with pytest.raises(ValueError, match=re.escape(
            f"{dense_dir / 'dense_index.json'}: the index holds 50 rows, but the corpus it "
            f"serves holds 49 passages")):
        DenseIndex.load(dense_dir, len(PASSAGES) - 1)


@pytest.fixture(scope="module")
def bm25_dir(store_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bm25")
    BM25Index.build(corpus_store.CorpusStore(store_dir), progress=False).save(directory)
    return directory


@pytest.mark.parametrize("damage, message", [
    (lambda d: _truncate(d / "data.csc.index.npy"), r"bm25s cannot read the BM25 index"),
    (lambda d: (d / "params.index.json").write_text("{not json"), r"bm25s cannot read"),
    (lambda d: None, r"covers 50 documents, but the corpus holds 51 passages"),
])
def test_a_corrupted_bm25_index_fails_at_load_naming_the_directory(bm25_dir, tmp_path, damage,
                                                                    message):
    copy = tmp_path / "bm25"
    shutil.copytree(bm25_dir, copy)
    damage(copy)
    passages = len(PASSAGES) + (1 if "covers" in message else 0)
    with pytest.raises(ValueError, match=message) as error:
        BM25Index.load(copy, passages)
    assert str(copy) in str(error.value)
    assert json.loads((bm25_dir / "params.index.json").read_text())  # the original untouched
