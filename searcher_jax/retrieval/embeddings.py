"""Corpus encoding in resumable shards: a killed run picks up at the first missing shard.

A shard is `shard_{i:06d}.npy`, float32 [shard_size, D] for rows [i * shard_size, ...),
written to a temporary name and renamed, so a shard on disk is always complete.
"""
import json
import pathlib

import numpy as np
from tqdm import tqdm

from searcher_jax.retrieval.corpus_store import CorpusStore
from searcher_jax.retrieval.encoder import TextEncoder


def _shard_path(directory: pathlib.Path, i: int) -> pathlib.Path:
    return directory / f"shard_{i:06d}.npy"


def encode_store(store: CorpusStore, encoder: TextEncoder, directory: str | pathlib.Path,
                 shard_size: int = 65_536, progress: bool = True) -> int:
    """Encodes every passage's rendered text; returns how many shards were (re)computed."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"num_passages": len(store), "shard_size": shard_size, "dim": encoder.dim,
            "spec": encoder.spec.__dict__}
    meta_file = directory / "embeddings.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()) != meta:
        raise ValueError(f"{directory} holds embeddings of another corpus, encoder or shard size "
                         f"({meta_file.read_text()}); use a fresh directory")
    meta_file.write_text(json.dumps(meta))
    num_shards = -(-len(store) // shard_size)
    computed = 0
    with tqdm(total=len(store), desc="encode", unit=" passages", disable=not progress) as bar:
        for i in range(num_shards):
            start, stop = i * shard_size, min((i + 1) * shard_size, len(store))
            path = _shard_path(directory, i)
            if path.is_file():
                bar.update(stop - start)
                continue
            vectors = encoder.encode_passages(store.rendered(start, stop), on_batch=bar.update)  # [stop - start, D]
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, vectors)
            tmp.rename(path)
            computed += 1
    return computed


def load_embeddings(directory: str | pathlib.Path) -> np.ndarray:
    """All shards as one float32 [N, D] array."""
    directory = pathlib.Path(directory)
    meta_file = directory / "embeddings.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: no embeddings in {directory}")
    meta = json.loads(meta_file.read_text())
    num_shards = -(-meta["num_passages"] // meta["shard_size"])
    missing = [i for i in range(num_shards) if not _shard_path(directory, i).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: {len(missing)} of {num_shards} shards missing "
                                f"(first: {_shard_path(directory, missing[0]).name}); rerun the encoding")
    out = np.empty((meta["num_passages"], meta["dim"]), np.float32)
    for i in range(num_shards):
        shard = np.load(_shard_path(directory, i), mmap_mode="r")
        out[i * meta["shard_size"]:i * meta["shard_size"] + len(shard)] = shard
    return out
