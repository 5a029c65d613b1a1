"""A compact on-disk corpus, memory-mapped: fetching k passages reads k records, not the corpus.

Layout of a store directory:
  {field}.bin      UTF-8 bytes of every passage's field, concatenated (field in id, title, text)
  {field}.offsets  int64 [N + 1] byte offsets into {field}.bin
  format.codes     uint8 [N], an index into FORMATS
  meta.json        {"num_passages", "formats"}
Rows are numbered 0..N-1 in corpus order; indexes return rows.

Opening a store checks what can be checked without reading the corpus: every file is there,
each file's size agrees with meta.json's passage count, the offsets end where the text ends
and the format codes name known formats. A row whose offsets or bytes are bad is reported
when it is read. Each error names the file (and the row).
"""
import json
import mmap
import pathlib
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from searcher_jax.retrieval.passage import FORMATS, Passage

_FIELDS = ("id", "title", "text")
_OFFSET_BYTES = np.dtype(np.int64).itemsize


class CorpusStoreError(ValueError):
    """A store file that disagrees with meta.json or with itself; the message names the file."""


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
        """Raises FileNotFoundError (a file missing) or CorpusStoreError (a file malformed,
        truncated or from another corpus), naming the file."""
        self.directory = pathlib.Path(directory)
        meta_file = self.directory / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: not a corpus store (build one with "
                                    "launch/build_index.py)")
        self._num, self._formats = _read_meta(meta_file)
        for path in [*(self.directory / f"{f}{ext}" for f in _FIELDS for ext in (".bin", ".offsets")),
                     self.directory / "format.codes"]:
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the corpus store in {self.directory} "
                                        f"is incomplete (rebuild it)")
        self._offsets = {f: self._checked_offsets(f) for f in _FIELDS}
        self._bins = {f: self._map(self.directory / f"{f}.bin") for f in _FIELDS}
        codes_file = self.directory / "format.codes"
        _check_size(codes_file, self._num, f"uint8 [{self._num}]", meta_file)
        self._codes = np.memmap(codes_file, dtype=np.uint8, mode="r") if self._num else []
        if self._num and int(self._codes.max()) >= len(self._formats):
            row = int(np.argmax(np.asarray(self._codes) >= len(self._formats)))
            raise CorpusStoreError(f"{codes_file}: row {row} has format code {self._codes[row]}, "
                                   f"but {meta_file} names {len(self._formats)} formats")

    def _checked_offsets(self, field: str) -> np.ndarray:
        """{field}.offsets, memory-mapped, once its size and its two ends agree with meta.json
        and {field}.bin."""
        path, bin_path = (self.directory / f"{field}{ext}" for ext in (".offsets", ".bin"))
        _check_size(path, (self._num + 1) * _OFFSET_BYTES,
                    f"int64 [num_passages + 1] = [{self._num + 1}]", self.directory / "meta.json")
        offsets = np.memmap(path, dtype=np.int64, mode="r")
        size = bin_path.stat().st_size
        if offsets[0] != 0 or offsets[-1] != size:
            raise CorpusStoreError(f"{path}: the offsets run from {offsets[0]} to {offsets[-1]}, "
                                   f"but {bin_path} holds {size} bytes (expected 0 to {size}): "
                                   f"one of them is truncated or from another corpus")
        return offsets

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
        start, end = int(offsets[row]), int(offsets[row + 1])
        if not 0 <= start <= end <= len(self._bins[field]):
            raise CorpusStoreError(f"{self.directory / f'{field}.offsets'}: row {row} spans bytes "
                                   f"[{start}, {end}) of {self.directory / f'{field}.bin'} "
                                   f"({len(self._bins[field])} bytes): the offsets are damaged")
        try:
            return self._bins[field][start:end].decode("utf-8")
        except UnicodeDecodeError as error:
            raise CorpusStoreError(f"{self.directory / f'{field}.bin'}: row {row} is not UTF-8 "
                                   f"({error.reason} at byte {start + error.start}): the file is "
                                   f"damaged") from None

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


def _read_meta(meta_file: pathlib.Path) -> tuple[int, tuple[str, ...]]:
    """(num_passages, formats) of a store's meta.json; CorpusStoreError naming it if malformed."""
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorpusStoreError(f"{meta_file}: not valid JSON ({error})") from None
    num = meta.get("num_passages") if isinstance(meta, dict) else None
    formats = meta.get("formats") if isinstance(meta, dict) else None
    if (not isinstance(num, int) or isinstance(num, bool) or num < 0
            or not isinstance(formats, list) or not all(f in FORMATS for f in formats)):
        raise CorpusStoreError(f"{meta_file}: expected {{\"num_passages\": an integer >= 0, "
                               f"\"formats\": a list of {list(FORMATS)}}}, got {str(meta)[:200]}")
    return num, tuple(formats)


def _check_size(path: pathlib.Path, expected: int, what: str, meta_file: pathlib.Path) -> None:
    size = path.stat().st_size
    if size != expected:
        raise CorpusStoreError(f"{path}: {size} bytes, expected {expected} ({what}, for the "
                               f"passages {meta_file} counts): truncated or from another corpus")
