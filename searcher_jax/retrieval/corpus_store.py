"""A compact on-disk corpus, memory-mapped: fetching k passages reads k records, not the corpus.

Layout of a store directory:
  {field}.bin      UTF-8 bytes of every passage's field, concatenated (field in id, title, text)
  {field}.offsets  int64 [N + 1] byte offsets into {field}.bin
  format.codes     uint8 [N], an index into FORMATS
  meta.json        {"num_passages", "formats"}
Rows are numbered 0..N-1 in corpus order; indexes return rows.
"""
import json
import mmap
import pathlib
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from searcher_jax.retrieval.passage import FORMATS, Passage

_FIELDS = ("id", "title", "text")


def write_store(passages: Iterable[Passage], directory: str | pathlib.Path, progress: bool = True) -> int:
    """Streams passages to a store directory (constant memory); returns the passage count."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bins = {f: open(directory / f"{f}.bin", "wb") for f in _FIELDS}
    offsets = {f: open(directory / f"{f}.offsets", "wb") for f in _FIELDS}
    codes = open(directory / "format.codes", "wb")
    position = dict.fromkeys(_FIELDS, 0)
    code_of = {name: i for i, name in enumerate(FORMATS)}
    count = 0
    try:
        for f in _FIELDS:
            offsets[f].write(np.int64(0).tobytes())
        for p in tqdm(passages, desc="corpus", unit=" passages", disable=not progress):
            for f in _FIELDS:
                data = getattr(p, f).encode("utf-8")
                bins[f].write(data)
                position[f] += len(data)
                offsets[f].write(np.int64(position[f]).tobytes())
            codes.write(bytes([code_of[p.format]]))
            count += 1
    finally:
        for handle in (*bins.values(), *offsets.values(), codes):
            handle.close()
    (directory / "meta.json").write_text(json.dumps({"num_passages": count, "formats": list(FORMATS)}))
    return count


class CorpusStore:
    """Read-only view of a store directory."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        meta_file = self.directory / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: not a corpus store (build one with "
                                    "launch/build_index.py)")
        meta = json.loads(meta_file.read_text())
        self._formats = tuple(meta["formats"])
        self._num = int(meta["num_passages"])
        self._offsets = {f: np.memmap(self.directory / f"{f}.offsets", dtype=np.int64, mode="r")
                         for f in _FIELDS}
        self._bins = {f: self._map(self.directory / f"{f}.bin") for f in _FIELDS}
        self._codes = np.memmap(self.directory / "format.codes", dtype=np.uint8, mode="r") if self._num else []

    @staticmethod
    def _map(path: pathlib.Path):
        if path.stat().st_size == 0:  # mmap refuses empty files
            return b""
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return self._num

    def _field(self, field: str, row: int) -> str:
        offsets = self._offsets[field]
        return self._bins[field][int(offsets[row]):int(offsets[row + 1])].decode("utf-8")

    def get(self, row: int) -> Passage:
        if not 0 <= row < self._num:
            raise IndexError(f"row {row} out of range for a corpus of {self._num} passages")
        return Passage(*(self._field(f, row) for f in _FIELDS), format=self._formats[self._codes[row]])

    def get_many(self, rows: Sequence[int]) -> list[Passage]:
        return [self.get(int(r)) for r in rows]

    def __iter__(self) -> Iterator[Passage]:
        return (self.get(r) for r in range(self._num))

    def rendered(self, start: int = 0, stop: int | None = None) -> list[str]:
        """render() of rows [start, stop), for encoding and BM25."""
        stop = self._num if stop is None else min(stop, self._num)
        return [self.get(r).render() for r in range(start, stop)]
