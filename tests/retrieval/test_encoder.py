"""Encoder parity with transformers (PyTorch): packaged MiniLM, and tiny random bge / e5 BERTs."""
import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from searcher_jax.retrieval.encoder import (BGE_QUERY_INSTRUCTION, TextEncoder, default_batch_size, length_buckets,
                                            packaged_minilm_dir)
from tests.conftest import REPO_ROOT

SENTENCES = [
    "Irish Home Rule movement party campaigned",
    "Title: Lucy Mair Text:  Lucy Philip Mair (28 January 1901 – 1 April 1986) was a British anthropologist.",
    "Who directed the 1997 thriller Mad City starring Dustin Hoffman and John Travolta?",
    "Barbara Strozzi   Barbara Strozzi (also called Barbara Valle; baptised 6 August 1619 – 11 November 1677) "
    "was an Italian singer and composer. Her Baroque compositions were published in her lifetime.",
    "a",
    "The Bad Pack is a 1997 independent action film written and directed by Brent Huff.",
]


def _torch_embed(model_dir, texts, pooling, max_length=256):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertModel.from_pretrained(model_dir).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def _cosines(a, b):
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_packaged_minilm_matches_transformers_mean_pooling(minilm_encoder):
    encoder = minilm_encoder  # shared with the real-data tests (max_length 128)
    ours = encoder.encode_passages(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    reference = _torch_embed(packaged_minilm_dir(), SENTENCES, "mean", encoder.spec.max_length)
    assert _cosines(ours, reference).min() > 0.9999
    # No prefixes for MiniLM: queries and passages encode the same way.
    np.testing.assert_allclose(encoder.encode_queries(SENTENCES[:2]), ours[:2], atol=1e-5)


def _tiny_bert_dir(tmp_path, name):
    """A random 2-layer BERT saved as safetensors, with MiniLM's (real) tokenizer files."""
    directory = tmp_path / name
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(directory, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(packaged_minilm_dir() / f, directory / f)
    assert (directory / "model.safetensors").is_file()
    return directory


@pytest.mark.parametrize("family", ["bge", "e5"])
def test_tiny_bert_families_match_transformers(tmp_path, family):
    directory = _tiny_bert_dir(tmp_path, f"{family}-tiny-random")
    encoder = TextEncoder.load(directory, max_length=128, batch_size=8)  # family guessed from the name
    queries, passages = SENTENCES[:3], SENTENCES[3:]
    if family == "bge":
        assert encoder.spec.pooling == "cls" and encoder.spec.query_prefix == BGE_QUERY_INSTRUCTION
        q_texts, p_texts, pooling = [BGE_QUERY_INSTRUCTION + q for q in queries], passages, "cls"
    else:
        assert encoder.spec.pooling == "mean"
        q_texts, p_texts, pooling = ["query: " + q for q in queries], ["passage: " + p for p in passages], "mean"
    ours_q, ours_p = encoder.encode_queries(queries), encoder.encode_passages(passages)
    assert _cosines(ours_q, _torch_embed(directory, q_texts, pooling, 128)).min() > 0.9999
    assert _cosines(ours_p, _torch_embed(directory, p_texts, pooling, 128)).min() > 0.9999
    # The prefix reaches the model (a random tiny BERT's outputs are close together, so
    # compare against float noise, not a cosine).
    assert np.abs(encoder.encode_queries(passages[:1]) - ours_p[:1]).max() > 1e-4


def test_sharded_batches_keep_order_and_truncate(tmp_path):
    assert len(jax.local_devices()) == 8  # tests/conftest.py: 8 host devices
    directory = _tiny_bert_dir(tmp_path, "e5-tiny-random")
    encoder = TextEncoder.load(directory, max_length=32, batch_size=16)
    texts = [" ".join(["word"] * n) + f" {n}" for n in (40, 1, 7, 3, 25, 2, 60, 9)] * 3  # 24: two batches
    sorted_ = encoder.encode(texts, sort_by_length=True)
    unsorted = encoder.encode(texts, sort_by_length=False)
    one_by_one = np.concatenate([encoder.encode([t]) for t in texts[:8]])
    np.testing.assert_allclose(sorted_, unsorted, atol=1e-5)
    np.testing.assert_allclose(sorted_[:8], one_by_one, atol=1e-5)
    with pytest.raises(ValueError, match="divide evenly"):
        TextEncoder.load(directory, batch_size=12)
    assert json.loads((directory / "config.json").read_text())["hidden_size"] == encoder.dim


@pytest.mark.parametrize("max_length", [256, 300, 512, 20, 16])
def test_length_buckets_pad_a_text_by_at_most_half_its_length(max_length):
    buckets = length_buckets(max_length)
    assert buckets[-1] == max_length and list(buckets) == sorted(set(buckets))
    for length in range(16, max_length + 1):
        padded = next(b for b in buckets if b >= length)
        assert padded <= 1.5 * length, (length, padded)
    assert len(length_buckets(512)) == 11  # compiled programs, at most


def test_default_batch_size_is_per_device():
    cpus = jax.local_devices()
    assert default_batch_size(cpus[:1]) == 16 and default_batch_size(cpus) == 16 * len(cpus)


def test_encoder_benchmark_compares_like_with_like(reference_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "launch"))  # as launch/benchmark.py runs the suites
    import bench_encoder  # pylint: disable=import-outside-toplevel
    out = tmp_path / "encoder.json"
    assert bench_encoder.main(["--corpus", str(reference_dir / "corpus" / "hotpotqa_qwen.corpus.jsonl"),
                               "--passages", "24", "--max_length", "64", "--repeats", "1",
                               "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["passages"] == 24 and result["real_tokens"] > 24
    assert result["min_cosine"] > 0.9999  # both sides computed the same vectors
    assert result["ours_jax"]["passages_per_s"] > 0 and result["transformers_torch"]["passages_per_s"] > 0
    assert 0 < result["floor"]["ours_fraction"] and result["floor"]["passages_per_s_at_matmul_rate"] > 0
