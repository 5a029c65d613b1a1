"""ScaNN index over passage embeddings: exact brute force, or tree + AH + reordering.

Memory (per passage, D dims; the corpus text is memory-mapped separately):
  brute force fp32: 4D bytes        (21M x 1024 -> 86 GB)
  tree + AH (2 dims/block, lut16 codes stored one byte per block): D/2 bytes (P/2 with a
    PCA projection to P dims), + reordering data: fp32 4D, bf16 2D, int8 D (+ 4 bytes norm), or none
  e.g. 21M x 1024 with int8 reordering: ~1.5 KB/passage, ~32 GB; AH only: ~10.7 GB.
`layout_for_budget` picks the most accurate of these that fits a stated RAM budget.
Building needs the fp32 embeddings in RAM once (ScaNN trains on the whole array).
"""
import dataclasses
import json
import pathlib
import time

import numpy as np
import scann
from google.protobuf import text_format
from scann import scann_ops_pybind
from scann.proto import scann_pb2

from searcher_jax.retrieval import scann_kernels

REORDER_TYPES = {"float32": scann.ReorderType.FLOAT32, "bfloat16": scann.ReorderType.BFLOAT16,
                 "int8": scann.ReorderType.INT8}
REORDER_BYTES_PER_DIM = {"float32": 4, "bfloat16": 2, "int8": 1, "none": 0}


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """kind: "auto" (brute force below `brute_force_below` passages, else tree_ah),
    "brute_force" (exact, as the authors' faiss flat index) or "tree_ah"."""
    kind: str = "auto"
    brute_force_below: int = 20_000
    num_leaves: int = 0            # 0: about 2 sqrt(N)
    # Real queries (short questions) sit off the passages' distribution: on 68k MiniLM
    # passages recall@10 0.95 needed about 13% of the leaves searched, or 6% with SOAR.
    leaves_to_search_fraction: float = 0.06
    # > 0: a query searches every leaf whose score is within this of its best leaf's score
    # (ScaNN's additive query spilling), at most leaves_to_search_fraction of them, instead
    # of always that many: a query with one clearly best region stops early.
    spill_threshold: float = 0.0
    spherical: bool = True         # spherical k-means for the tree: unit vectors, dot product
    # SOAR: each passage also goes to a second leaf chosen to cover the first one's
    # residual error (AH codes stored twice); on that corpus it cut the leaves needed in half.
    soar_lambda: float | None = 1.5
    avq: float | None = 2.5        # anisotropic (score-aware) tree centroids
    training_sample_size: int = 250_000
    # PCA (then a random rotation) to this many dims for the tree and the AH codes (0: none);
    # reordering still scores the full vectors. On the 68k MiniLM benchmark 160 of 384 dims
    # kept the recall of the searched leaves and cut the cost per leaf (README, Benchmarks).
    pca_dims: int = 0
    dims_per_block: int = 2
    anisotropic_threshold: float = 0.2
    reorder_dtype: str = "float32"  # "float32" | "bfloat16" | "int8" | "none"
    reorder_neighbors: int = 50    # 100 gained < 0.001 recall@10 over 50 and cost ~10% q/s
    max_k: int = 100               # ScaNN's default k (search asks for its own)

    def __post_init__(self):
        if self.kind not in ("auto", "brute_force", "tree_ah"):
            raise ValueError(f"index kind must be auto, brute_force or tree_ah, got {self.kind!r}")
        if self.reorder_dtype not in REORDER_BYTES_PER_DIM:
            raise ValueError(f"reorder_dtype must be one of {sorted(REORDER_BYTES_PER_DIM)}")
        if self.spill_threshold < 0:
            raise ValueError(f"spill_threshold must be 0 (a fixed number of leaves) or positive, "
                             f"got {self.spill_threshold}")
        if self.pca_dims < 0:
            raise ValueError(f"pca_dims must be 0 (no projection) or a positive width, got {self.pca_dims}")

    def resolved_kind(self, num_passages: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "brute_force" if num_passages < self.brute_force_below else "tree_ah"

    def leaves(self, num_passages: int) -> int:
        # A leaf needs a few dozen points for k-means to be meaningful.
        wanted = self.num_leaves or int(2 * np.sqrt(num_passages))
        return max(1, min(wanted, num_passages // 40))


def planned_bytes_per_passage(dim: int, cfg: IndexConfig, num_passages: int) -> float:
    """The index's RAM per passage for a layout (vectors only; AH codes one byte per block)."""
    if cfg.resolved_kind(num_passages) == "brute_force":
        return 4.0 * dim
    reorder = REORDER_BYTES_PER_DIM[cfg.reorder_dtype] * dim + (4 if cfg.reorder_dtype == "int8" else 0)
    leaves = 1 if cfg.soar_lambda is None else 2  # SOAR stores a point's code in two leaves
    coded_dims = cfg.pca_dims or dim
    return leaves * (coded_dims / cfg.dims_per_block + 4) + reorder  # codes + the point's id per leaf


def layout_for_budget(num_passages: int, dim: int, budget_bytes: float,
                      base: IndexConfig = IndexConfig()) -> IndexConfig:
    """The most accurate layout whose planned size fits the budget; raises if none does."""
    candidates = [dataclasses.replace(base, kind="brute_force")] if num_passages < base.brute_force_below else []
    # Exact reordering decides the final top-k, so it keeps its precision before SOAR's
    # second copy of the codes is kept.
    soar = [base.soar_lambda, None] if base.soar_lambda is not None else [None]
    candidates += [dataclasses.replace(base, kind="tree_ah", reorder_dtype=r, soar_lambda=s)
                   for r in ("float32", "bfloat16", "int8", "none") for s in soar]
    for cfg in candidates:
        if planned_bytes_per_passage(dim, cfg, num_passages) * num_passages <= budget_bytes:
            return cfg
    smallest = planned_bytes_per_passage(dim, candidates[-1], num_passages) * num_passages
    raise ValueError(f"no single-host layout fits {budget_bytes / 1e9:.1f} GB for {num_passages} x {dim} "
                     f"(smallest: AH codes only, {smallest / 1e9:.1f} GB); raise the budget or use fewer "
                     f"dimensions")


def index_type(searcher) -> str:
    """What ScaNN actually built, read back from its config."""
    config = searcher.config()
    if "partitioning" in config and "hash" in config:
        pca = "projection_type: PCA" in config
        reorder = "exact_reordering" in config
        return "tree" + ("_pca" if pca else "") + "_ah" + ("_reorder" if reorder else "")
    if "brute_force" in config:
        return "brute_force"
    return "other"


class DenseIndex:
    """Maximum inner product search over unit vectors; returns rows and scores."""

    def __init__(self, searcher, num_passages: int, dim: int, built_type: str, leaves_to_search: int):
        scann_kernels.enable_default()
        self._searcher = searcher
        self.num_passages = num_passages
        self.dim = dim
        self.built_type = built_type
        self._leaves_to_search = leaves_to_search
        self._num_leaves, self._reorder_depth = tree_and_reorder_sizes(searcher.config())

    @classmethod
    def build(cls, embeddings: np.ndarray, cfg: IndexConfig) -> "DenseIndex":
        # embeddings [N, D] float32
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        n, dim = embeddings.shape
        if n == 0:
            raise ValueError("cannot build an index over an empty corpus")
        builder = scann_ops_pybind.builder(embeddings, min(cfg.max_k, n), "dot_product")
        leaves_to_search = 0
        if cfg.resolved_kind(n) == "brute_force":
            builder = builder.score_brute_force()
        else:
            if cfg.pca_dims >= dim:
                raise ValueError(f"pca_dims ({cfg.pca_dims}) must be below the embedding width ({dim})")
            leaves = cfg.leaves(n)
            leaves_to_search = max(1, int(round(leaves * cfg.leaves_to_search_fraction)))
            builder = builder.tree(num_leaves=leaves, num_leaves_to_search=leaves_to_search,
                                   training_sample_size=min(cfg.training_sample_size, n),
                                   spherical=cfg.spherical, soar_lambda=cfg.soar_lambda,
                                   avq=cfg.avq)
            if cfg.pca_dims:
                builder = builder.pca(reduction_dim=cfg.pca_dims, pca_significance_threshold=None)
            builder = builder.score_ah(cfg.dims_per_block, anisotropic_quantization_threshold=cfg.anisotropic_threshold,
                                       training_sample_size=min(cfg.training_sample_size, n))
            if cfg.reorder_dtype != "none":
                builder = builder.reorder(cfg.reorder_neighbors, quantize=REORDER_TYPES[cfg.reorder_dtype])
        searcher = _create_searcher(builder, embeddings, cfg if leaves_to_search else None)
        return cls(searcher, n, dim, index_type(searcher), leaves_to_search)

    def search(self, queries: np.ndarray, k: int,
               leaves_to_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries [B, D] -> (rows [B, k'] int64, scores [B, k'] float32), k' = min(k, N).

        Each query gets k' distinct corpus rows, best first, with finite scores. Raises
        ValueError for queries not [B, D], and RuntimeError when the leaves a query may
        search hold fewer than k' passages (a tree index with spill_threshold set, on a
        corpus too small for its k).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [B, {self.dim}], got {queries.shape}")
        k = min(k, self.num_passages)
        if len(queries) == 0 or k == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        rows, scores, found = self._search_once(queries, k, leaves_to_search or self._leaves_to_search)
        short = found < k
        if self._num_leaves and short.any():
            # The leaves these queries searched held fewer than k passages; all the leaves
            # together hold every passage (but spill_threshold may still stop a search early).
            rows[short], scores[short], found[short] = self._search_once(queries[short], k, self._num_leaves)
        if np.any(found < k):
            raise RuntimeError(f"the dense index ({self.built_type}, {self.num_passages} passages) found only "
                               f"{found.min()} passages for a query, not k={k}: a tree index with "
                               f"spill_threshold set searches only the leaves near a query's best one; "
                               f"ask for fewer, or rebuild it with a larger spill_threshold")
        return rows, scores

    def _search_once(self, queries: np.ndarray, k: int,
                     leaves_to_search: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One ScaNN call for queries [B, D] float32; -> real_neighbours() of its answer."""
        kwargs = {"final_num_neighbors": k}
        if self._num_leaves:
            # ScaNN reorders only its build-time depth (reorder_neighbors) of candidates, and
            # pads an answer beyond it with row 0 and score NaN: reorder at least k.
            kwargs.update(leaves_to_search=leaves_to_search,
                          pre_reorder_num_neighbors=max(k, self._reorder_depth))
        rows, scores = self._searcher.search_batched_parallel(queries, **kwargs)
        return real_neighbours(rows, scores, k, self.num_passages)

    def save(self, directory: str | pathlib.Path) -> int:
        """Writes the searcher and its metadata; returns the bytes written."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._searcher.serialize(str(directory), relative_path=True)
        (directory / "dense_index.json").write_text(json.dumps({
            "num_passages": self.num_passages, "dim": self.dim, "built_type": self.built_type,
            "leaves_to_search": self._leaves_to_search}))
        return directory_bytes(directory)

    @classmethod
    def load(cls, directory: str | pathlib.Path, num_passages: int | None = None) -> "DenseIndex":
        """The index `save` wrote; with `num_passages`, checked to index that many (the corpus
        it serves). Raises FileNotFoundError (no dense_index.json) or ValueError naming the
        file: dense_index.json malformed, ScaNN's files unreadable (truncated, garbage,
        another dtype), ScaNN's row count or width not the one dense_index.json records (files
        of two builds mixed), or another row count than `num_passages`."""
        directory = pathlib.Path(directory)
        meta_file = directory / "dense_index.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: not a dense index directory")
        meta = _read_index_meta(meta_file)
        if num_passages is not None and meta["num_passages"] != num_passages:
            raise ValueError(f"{meta_file}: the index holds {meta['num_passages']} rows, but the "
                             f"corpus it serves holds {num_passages} passages (an index of "
                             f"another corpus)")
        dataset = directory / "dataset.npy"  # brute force's vectors, [N, D] float32
        if dataset.is_file():
            try:
                vectors = np.load(dataset, mmap_mode="r")
            except (ValueError, OSError, EOFError) as error:
                raise ValueError(f"{dataset}: not a readable .npy file ({error}); rebuild the "
                                 f"index with launch/build_index.py") from None
            expected = (meta["num_passages"], meta["dim"])
            if vectors.shape != expected or vectors.dtype != np.float32:
                raise ValueError(f"{dataset}: float32 {list(expected)} expected (from "
                                 f"{meta_file}), found {vectors.dtype} {list(vectors.shape)}")
        try:
            searcher = scann_ops_pybind.load_searcher(str(directory))
        except RuntimeError as error:
            raise ValueError(f"{directory}: ScaNN cannot load the index ({error}); rebuild it "
                             f"with launch/build_index.py") from None
        if searcher.size() != meta["num_passages"]:
            raise ValueError(f"{directory}: the ScaNN index holds {searcher.size()} rows, but "
                             f"{meta_file} records {meta['num_passages']} passages")
        return cls(searcher, meta["num_passages"], meta["dim"], meta["built_type"], meta["leaves_to_search"])


def _read_index_meta(meta_file: pathlib.Path) -> dict:
    """dense_index.json, checked: ValueError naming it if malformed."""
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{meta_file}: not valid JSON ({error})") from None
    types = {"num_passages": int, "dim": int, "built_type": str, "leaves_to_search": int}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in types.items()):
        raise ValueError(f"{meta_file}: expected the keys {sorted(types)} (integers, built_type a "
                         f"string), got {str(meta)[:200]}")
    return meta


def tree_and_reorder_sizes(config: str) -> tuple[int, int]:
    """A searcher's text config -> (leaves in its tree, 0 for brute force; the number of
    candidates it reorders by default, 0 without reordering)."""
    parsed = text_format.Parse(config, scann_pb2.ScannConfig())
    leaves = parsed.partitioning.num_children if parsed.HasField("partitioning") else 0
    depth = parsed.exact_reordering.approx_num_neighbors if parsed.HasField("exact_reordering") else 0
    return leaves, depth


def real_neighbours(rows: np.ndarray, scores: np.ndarray, k: int,
                    num_passages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ScaNN's answer (rows [B, M] int, scores [B, M] float, M >= k) -> its real neighbours, best
    first: (rows [B, k] int64, scores [B, k] float32, found [B] int64: how many of the k are real).

    ScaNN fills the places it found no passage for with row 0 and score NaN. Those, rows
    outside [0, num_passages) and the lower-scored copy of a repeated row are dropped; a
    query with found < k has row -1 and score -inf in its last k - found places.
    """
    real = np.isfinite(scores) & (rows >= 0) & (rows < num_passages)
    by_score = np.argsort(np.where(real, -scores, np.inf), axis=1, kind="stable")
    rows, scores, real = (np.take_along_axis(a, by_score, 1) for a in (rows, scores, real))
    real &= ~_later_repeats(np.where(real, rows, -1 - np.arange(rows.shape[1])))
    kept = np.argsort(~real, axis=1, kind="stable")[:, :k]
    rows, scores, real = (np.take_along_axis(a, kept, 1) for a in (rows, scores, real))
    return (np.where(real, rows, -1).astype(np.int64), np.where(real, scores, -np.inf).astype(np.float32),
            real.sum(axis=1))


def _later_repeats(keys: np.ndarray) -> np.ndarray:
    """keys [B, M] -> [B, M] bool: True where the same key appeared earlier in the row."""
    order = np.argsort(keys, axis=1, kind="stable")  # stable: the first of equal keys stays first
    ordered = np.take_along_axis(keys, order, 1)
    repeat = np.zeros(keys.shape, bool)
    np.put_along_axis(repeat, order[:, 1:], ordered[:, 1:] == ordered[:, :-1], 1)
    return repeat


def _create_searcher(builder, embeddings: np.ndarray, tree_cfg: IndexConfig | None):
    """builder.build(), with the tree options the builder has no argument for set in its config."""
    if tree_cfg is None or not (tree_cfg.pca_dims or tree_cfg.spill_threshold):
        return builder.build()
    config = text_format.Parse(builder.create_config(), scann_pb2.ScannConfig())
    if tree_cfg.pca_dims:
        # PCA leaves most of the variance in the first components, so the AH blocks (16 centres
        # each) would be very unequal; a random rotation after the PCA spreads the variance
        # evenly over them (recall@10 0.75 -> 0.91 on 64-d vectors with a steep spectrum, PCA
        # to 32).
        config.partitioning.projection.pca_random_rotate_projection_matrix = True
    if tree_cfg.spill_threshold:
        spilling = config.partitioning.query_spilling
        spilling.spilling_type = spilling.ADDITIVE
        spilling.spilling_threshold = tree_cfg.spill_threshold
    return scann_ops_pybind.create_searcher(embeddings, text_format.MessageToString(config))


def directory_bytes(directory: str | pathlib.Path) -> int:
    return sum(p.stat().st_size for p in pathlib.Path(directory).rglob("*") if p.is_file())


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int, chunk: int = 262_144) -> np.ndarray:
    """Exact top-k rows by inner product, streaming over [N, D] (which may be memory-mapped)."""
    # best_rows, best_scores [B, k]
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(embeddings), chunk):
        block = np.asarray(embeddings[start:start + chunk], np.float32)
        scores = np.concatenate([best_scores, queries @ block.T], axis=1)
        rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, start + len(block)),
                                                          (len(queries), len(block)))], axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores, keep, 1)
        best_rows = np.take_along_axis(rows, keep, 1)
    return best_rows


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k rows that were found. found, exact [B, k]."""
    hits = [len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact)]
    return float(np.sum(hits) / exact.size)


def timed_build(embeddings: np.ndarray, cfg: IndexConfig) -> tuple[DenseIndex, float]:
    start = time.perf_counter()
    index = DenseIndex.build(embeddings, cfg)
    return index, time.perf_counter() - start
