"""Retrieval benchmark: ScaNN against faiss-cpu (IndexFlatIP, IndexHNSWFlat) in one run.

  python launch/benchmark.py --suite=retrieval [-- --sentences --sentence_window 4 --corpus a.jsonl ...]

On the same all-MiniLM-L6-v2 embeddings of real passages (default: the reference corpora
under ../shared/reference/corpus, de-duplicated, 14,372 passages; --sentences adds each of
their sentences as a passage, 67,748 in all; --sentence_window 4 adds each run
of 2, 3 and 4 consecutive sentences too, 127,926 in all; pass other corpora with --corpus)
and real queries (the queries the released model wrote, reference/corpus/*.questions.jsonl):
queries/s and recall@10 against exact search for every index setting; a head-to-head of each
ScaNN layout's and each HNSW graph's cheapest setting that reaches the target recall (the
sweep's first, bisected against the setting before it), timed in alternating rounds, and the
median of the rounds' ScaNN/HNSW ratios; the best ScaNN setting with the wheel's own
kernels against AVX2 (searcher_jax/retrieval/scann_kernels.py); the latency of a 64-query
batch through the whole dense retriever (encoder included); bytes per million passages.
Embeddings are cached under --cache_dir (encoding takes minutes on a CPU: 11 for the 67,748).

--real_eval also reports, on the 4,750 HotpotQA abstracts alone, how often our top-3 holds the
authors' first passage and the gold answer (dense MiniLM exact search, and BM25).
"""
import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import sys
import time
from typing import Callable

from bench_common import json_main

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE = REPO_ROOT.parent / "shared" / "reference"
REFERENCE_SETS = ["hotpotqa_qwen", "hotpotqa_llama", "2wiki_qwen", "bamboogle_qwen", "bamboogle_llama"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", nargs="*", default=[],
                        help="corpus files (default: the reference corpora, hotpotqa_qwen first)")
    parser.add_argument("--reference_dir", default=os.environ.get("SEARCHER_REFERENCE", str(DEFAULT_REFERENCE)))
    parser.add_argument("--cache_dir", default=str(REPO_ROOT / "artifacts" / "bench_retrieval"))
    parser.add_argument("--max_length", type=int, default=256, help="encoder max tokens (MiniLM's own limit)")
    parser.add_argument("--encoder_batch_size", type=int, default=0, help="0: the encoder's default")
    parser.add_argument("--num_queries", type=int, default=2000)
    parser.add_argument("--target_recall", type=float, default=0.95)
    parser.add_argument("--pca_dims", type=int, default=160,
                        help="also benchmark the tree on a PCA projection to this many dims with int8 "
                             "reordering (0: only the default layout)")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per setting (best is kept)")
    parser.add_argument("--rounds", type=int, default=21,
                        help="alternating timed rounds of the head-to-head (ScaNN against HNSW)")
    parser.add_argument("--real_eval", action="store_true")
    parser.add_argument("--sentences", action="store_true",
                        help="also index every sentence (>= 5 words) of every passage as a passage of "
                             "its own, with its title: the 14k reference passages give ~68k real-text ones")
    parser.add_argument("--sentence_window", type=int, default=1,
                        help="with --sentences: also every run of 2..N consecutive sentences of a passage")
    parser.add_argument("--out", default="", help="write the result JSON here too")


@dataclasses.dataclass(frozen=True)
class Tuner:
    """How to rerun a swept setting: make(value) -> (search, DenseIndex or None) for the row key."""
    family: str  # one layout or one graph: its settings differ only in `key`
    key: str     # "leaves_to_search" | "spill_threshold" | "efSearch"
    make: Callable[[float], tuple]


def _head_to_head(searches, queries, rounds):
    """qps [rounds, len(searches)]: every search timed once per round, in turn."""
    import numpy as np
    qps = np.zeros((rounds, len(searches)))
    for r in range(rounds):
        for c, search in enumerate(searches):
            start = time.perf_counter()
            search(queries)
            qps[r, c] = len(queries) / (time.perf_counter() - start)
    return qps


def _timed_qps(search, queries, repeats):
    search(queries[:64])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        rows = search(queries)
        best = min(best, time.perf_counter() - start)
    return rows, len(queries) / best


def _kernel_speedup(search, queries, rounds) -> dict:
    """The same ScaNN search with the wheel's own kernels (SSE4) and with AVX2, in alternating rounds."""
    import numpy as np
    from searcher_jax.retrieval import scann_kernels

    def under(avx2):
        def run(q):
            with scann_kernels.avx2(avx2):
                return search(q)
        return run

    qps = _head_to_head([under(False), under(True)], queries, rounds)  # [R, 2]
    return {"used": "avx2" if scann_kernels.avx2_enabled() else "scann's own choice",
            "wheel_default_qps": round(float(np.median(qps[:, 0])), 1),
            "avx2_qps": round(float(np.median(qps[:, 1])), 1),
            "avx2_speedup": round(float(np.median(qps[:, 1] / qps[:, 0])), 2)}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
SENTENCE_ID_MARK = "#sentence"  # ids {passage id}#sentence-{i} and {passage id}#sentences-{i}-{i + 1}


def _corpus_files(args) -> list:
    return args.corpus or [pathlib.Path(args.reference_dir) / "corpus" / f"{s}.corpus.jsonl"
                           for s in REFERENCE_SETS]


def _corpus_passages(args):
    """The corpus files' passages, de-duplicated, then (--sentences) their sentences."""
    from searcher_jax.retrieval import corpus_formats
    passages, seen = [], set()
    for path in _corpus_files(args):
        for p in corpus_formats.read_corpus(path):
            text = p.render()
            if text not in seen:  # the reference sets share passages; duplicates would tie
                seen.add(text)
                passages.append(p)
    yield from passages
    if args.sentences:
        yield from _sentence_passages(passages, window=1)
    for window in range(2, args.sentence_window + 1) if args.sentences else ():
        yield from _sentence_passages(passages, window)


def _sentence_passages(passages, window: int):
    """Runs of `window` consecutive sentences of each passage's text (each sentence >= 5 words),
    as passages with the same title; de-duplicated, and never a passage's whole text."""
    from searcher_jax.retrieval.passage import Passage
    seen = set()
    for p in passages:
        body = p.text if p.format in ("hotpot_abstract", "kilt_100w") else p.render()
        sentences = _SENTENCE_END.split(body.strip())
        if window > 1 and len(sentences) <= window:
            continue  # the run would repeat the passage itself
        for i in range(len(sentences) - window + 1):
            run = sentences[i:i + window]
            text = " ".join(run)
            if all(len(x.split()) >= 5 for x in run) and (p.title, text) not in seen:
                seen.add((p.title, text))
                suffix = f"-{i}" if window == 1 else f"s-{i}-{i + window - 1}"
                yield Passage(id=f"{p.id}{SENTENCE_ID_MARK}{suffix}", title=p.title, text=" " + text,
                              format="hotpot_abstract")


def _cache_key(args) -> str:
    stamp = [(str(f), pathlib.Path(f).stat().st_size) for f in _corpus_files(args)] + [args.max_length]
    if args.sentences:
        stamp.append("sentences")
    if args.sentences and args.sentence_window > 1:
        stamp.append(f"sentence_window_{args.sentence_window}")
    return hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:12]


def _load_queries(reference_dir: pathlib.Path, limit: int) -> list[str]:
    from searcher_jax.retrieval.reference_eval import load_reference_queries
    out = []
    for s in REFERENCE_SETS:
        out += [q.query for q in load_reference_queries(reference_dir / "corpus" / f"{s}.questions.jsonl")]
    return list(dict.fromkeys(out))[:limit]


def run(args: argparse.Namespace) -> dict:
    import faiss
    import numpy as np
    from searcher_jax.retrieval import corpus_store, dense_index, embeddings
    from searcher_jax.retrieval.encoder import TextEncoder
    from searcher_jax.retrieval.retriever import DenseRetriever

    reference_dir = pathlib.Path(args.reference_dir)
    cache = pathlib.Path(args.cache_dir) / _cache_key(args)
    if not (cache / "corpus" / "meta.json").is_file():
        corpus_store.write_store(_corpus_passages(args), cache / "corpus")
    store = corpus_store.CorpusStore(cache / "corpus")
    encoder = TextEncoder.load(max_length=args.max_length, batch_size=args.encoder_batch_size)
    t = time.perf_counter()
    computed = embeddings.encode_store(store, encoder, cache / "embeddings", shard_size=8192)
    encode_s = time.perf_counter() - t
    base = embeddings.load_embeddings(cache / "embeddings")  # [N, D]
    n, dim = base.shape
    query_texts = _load_queries(reference_dir, args.num_queries)
    queries = encoder.encode_queries(query_texts)  # [Q, D]
    exact = dense_index.exact_search(base, queries, 10)
    rows_out = []

    searches, indexes = [], []  # each row's search function, and its DenseIndex if it is ours
    tuners = []  # each row's Tuner, if its setting can be refined

    def record(name, params, search, bytes_used, build_s, index=None, tuner=None):
        found, qps = _timed_qps(search, queries, args.repeats)
        searches.append(search)
        indexes.append(index)
        tuners.append(tuner)
        rows_out.append({"index": name, **params, "qps": round(qps, 1),
                         "recall_at_10": round(dense_index.recall_at_k(found, exact), 4),
                         "bytes_per_million": round(bytes_used / n * 1e6), "build_s": round(build_s, 2)})
        print(json.dumps(rows_out[-1]), flush=True)

    record("numpy_exact", {}, lambda q: dense_index.exact_search(base, q, 10), base.nbytes, 0.0)

    brute, build_s = dense_index.timed_build(base, dense_index.IndexConfig(kind="brute_force"))
    record("scann_brute_force", {}, lambda q: brute.search(q, 10)[0], brute.save(cache / "scann_brute_force"),
           build_s)
    # The index's default tree layout; the same tree on a PCA projection with int8 reordering;
    # and that one with an adaptive number of leaves per query (a build per spill threshold).
    # These are the layouts measured fastest on these embeddings (README).
    tree_layouts = [("default", 0.0, dense_index.IndexConfig(kind="tree_ah"))]
    if 0 < args.pca_dims < dim:
        pca = dense_index.IndexConfig(kind="tree_ah", pca_dims=args.pca_dims, reorder_dtype="int8")
        tree_layouts.append((f"pca{args.pca_dims}_int8", 0.0, pca))
        tree_layouts += [(f"pca{args.pca_dims}_int8_spill", t,
                          dataclasses.replace(pca, spill_threshold=t, leaves_to_search_fraction=0.2))
                         for t in (0.09, 0.1, 0.105, 0.11, 0.1125, 0.115, 0.1175, 0.12, 0.13)]

    def leaves_tuner(layout, index):
        return Tuner(layout, "leaves_to_search",
                     lambda s: (lambda q: index.search(q, 10, leaves_to_search=s)[0], index))

    def threshold_tuner(layout, cfg):  # a spill threshold is built into the index
        def make(threshold):
            index, _ = dense_index.timed_build(base, dataclasses.replace(cfg, spill_threshold=threshold))
            return (lambda q: index.search(q, 10)[0]), index
        return Tuner(layout, "spill_threshold", make)

    for layout, threshold, cfg in tree_layouts:
        tree_index, build_s = dense_index.timed_build(base, cfg)
        tree_bytes = tree_index.save(cache / f"scann_tree_ah_{layout}")
        leaves = cfg.leaves(n)
        # A spilling layout's fraction is a cap, not a setting to sweep.
        fractions = ((cfg.leaves_to_search_fraction,) if threshold else
                     (0.03, 0.04, 0.05, 0.055, 0.06, 0.065, 0.07, 0.08, 0.1, 0.12, 0.16))
        for fraction in fractions:
            to_search = max(1, round(leaves * fraction))
            record("scann_tree_ah", {"layout": layout, "built_type": tree_index.built_type, "leaves": leaves,
                                     "leaves_to_search": to_search, "spill_threshold": threshold},
                   lambda q, s=to_search, index=tree_index: index.search(q, 10, leaves_to_search=s)[0],
                   tree_bytes, build_s, tree_index,
                   threshold_tuner(layout, cfg) if threshold else leaves_tuner(layout, tree_index))

    flat = faiss.IndexFlatIP(dim)
    flat.add(base)
    record("faiss_flat_ip", {}, lambda q: flat.search(q, 10)[1], len(faiss.serialize_index(flat)), 0.0)
    for m in (16, 32):
        t = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 200
        hnsw.add(base)
        hnsw_build_s = time.perf_counter() - t
        hnsw_bytes = len(faiss.serialize_index(hnsw))

        def hnsw_search(ef, index=hnsw):  # efSearch per call: the head-to-head reruns settings
            return lambda q: index.search(q, 10, params=faiss.SearchParametersHNSW(efSearch=ef))[1]

        tuner = Tuner(f"hnsw_M{m}", "efSearch", lambda ef, search=hnsw_search: (search(ef), None))
        for ef in (12, 14, 16, 18, 20, 24, 32, 64, 128):
            record("faiss_hnsw", {"M": m, "efSearch": ef}, hnsw_search(ef), hnsw_bytes, hnsw_build_s,
                   tuner=tuner)

    # Head to head: each layout's and each graph's cheapest setting that reaches the target
    # recall (recall is deterministic, so the choice does not depend on a noisy timing), timed
    # in alternating rounds so that a change in the machine's load hits both sides of each
    # round's ratio.
    def passes(search) -> bool:
        return dense_index.recall_at_k(search(queries), exact) >= args.target_recall

    def cheapest(family) -> int:
        """The row of the family's cheapest passing setting: the sweep's first, then bisected
        between it and the sweep's setting before it (recorded as a new row)."""
        positions = [p for p, t in enumerate(tuners) if t is not None and t.family == family]
        first = next(p for p in positions if rows_out[p]["recall_at_10"] >= args.target_recall)
        if first == positions[0]:
            return first
        tuner = tuners[first]
        below, above = rows_out[positions[positions.index(first) - 1]][tuner.key], rows_out[first][tuner.key]
        built = {}

        def make(value):
            if value not in built:
                built[value] = tuner.make(value)
            return built[value]

        if isinstance(above, int):
            while above - below > 1:
                middle = (above + below) // 2
                below, above = (below, middle) if passes(make(middle)[0]) else (middle, above)
        else:
            for _ in range(4):
                middle = round((above + below) / 2, 6)
                below, above = (below, middle) if passes(make(middle)[0]) else (middle, above)
        if above == rows_out[first][tuner.key]:
            return first
        row = rows_out[first]
        params = {k: v for k, v in row.items() if k not in ("index", "qps", "recall_at_10", "bytes_per_million",
                                                            "build_s")}
        search, index = make(above)
        record(row["index"], {**params, tuner.key: above, "bisected": True}, search,
               row["bytes_per_million"] * n / 1e6, row["build_s"], index, tuner)
        return len(rows_out) - 1

    families = list(dict.fromkeys(t.family for t in tuners if t is not None))
    contenders = [cheapest(f) for f in families
                  if any(t is not None and t.family == f and row["recall_at_10"] >= args.target_recall
                         for t, row in zip(tuners, rows_out))]
    qps_by_round = _head_to_head([searches[p] for p in contenders], queries, args.rounds)  # [R, C]
    median_qps = np.median(qps_by_round, axis=0)  # [C]
    head_to_head = [{**rows_out[p], "qps": round(float(q), 1)} for p, q in zip(contenders, median_qps)]
    is_scann = np.array([row["index"] == "scann_tree_ah" for row in head_to_head])
    scann_best = hnsw_best = ratio = None
    if is_scann.any():
        scann_best = head_to_head[int(np.argmax(np.where(is_scann, median_qps, -1)))]
    if (~is_scann).any():
        hnsw_best = head_to_head[int(np.argmax(np.where(is_scann, -1, median_qps)))]
    if scann_best and hnsw_best:
        per_round = qps_by_round[:, is_scann].max(axis=1) / qps_by_round[:, ~is_scann].max(axis=1)
        ratio = {"median": round(float(np.median(per_round)), 2),
                 "quartiles": [round(float(q), 2) for q in np.percentile(per_round, [25, 75])],
                 "rounds": len(per_round)}
    best_position = contenders[head_to_head.index(scann_best)] if scann_best else \
        next(p for p, row in enumerate(rows_out) if row["index"] == "scann_tree_ah")
    kernels = _kernel_speedup(searches[best_position], queries, args.rounds)
    retriever = DenseRetriever(store, encoder, indexes[best_position],
                               leaves_to_search=rows_out[best_position]["leaves_to_search"])
    batch = query_texts[:64]
    retriever.search(batch, 3)  # compile
    latencies = []
    for _ in range(5):
        start = time.perf_counter()
        retriever.search(batch, 3)
        latencies.append(time.perf_counter() - start)
    result = {
        "suite": "retrieval", "corpus": [str(f) for f in (args.corpus or ["reference corpora"])],
        "sentences_as_passages": args.sentences, "sentence_window": args.sentence_window if args.sentences else 0,
        "passages": n, "dim": dim, "queries": len(queries), "encoder": "all-MiniLM-L6-v2 (JAX)",
        "max_length": args.max_length, "embedding_shards_computed": computed, "encode_s": round(encode_s, 1),
        "rows": rows_out, "target_recall": args.target_recall,
        "scann_best": scann_best, "hnsw_best": hnsw_best,
        "head_to_head": head_to_head, "scann_over_hnsw_qps": ratio, "scann_kernels": kernels,
        "latency_64_queries_with_encoder_s": {"median": round(float(np.median(latencies)), 4),
                                              "min": round(min(latencies), 4)},
        "cpu_count": os.cpu_count(),
    }
    if args.real_eval:
        result["real_eval"] = real_eval(store, base, reference_dir, encoder)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def real_eval(store, base, reference_dir: pathlib.Path, encoder) -> dict:
    """Full-corpus agreement on the HotpotQA abstracts (rows of hotpotqa_qwen in the cached corpus)."""
    from searcher_jax.retrieval import corpus_store, dense_index, reference_eval
    from searcher_jax.retrieval.bm25 import BM25Index
    from searcher_jax.retrieval.retriever import BM25Retriever, DenseRetriever

    ids = [store.get(r).id for r in range(len(store))]
    rows = [r for r, i in enumerate(ids) if i.startswith("hotpotqa_qwen-") and SENTENCE_ID_MARK not in i]
    if not rows:
        return {"skipped": "the corpus holds no hotpotqa_qwen passages (run on the reference corpora)"}
    directory = pathlib.Path(store.directory).parent / "hotpotqa_qwen_store"
    if not (directory / "meta.json").is_file():
        corpus_store.write_store((store.get(r) for r in rows), directory, progress=False)
    sub = corpus_store.CorpusStore(directory)
    by_id = {p.id: p for p in sub}
    queries = reference_eval.load_reference_queries(reference_dir / "corpus" / "hotpotqa_qwen.questions.jsonl")
    texts = [q.query for q in queries]
    exact_index = dense_index.DenseIndex.build(base[rows], dense_index.IndexConfig(kind="brute_force"))
    dense = DenseRetriever(sub, encoder, exact_index)
    bm25 = BM25Retriever(sub, BM25Index.build(sub, progress=False))
    return {"passages": len(sub),
            "dense_minilm_exact": reference_eval.agreement(queries, dense.search(texts, 3), by_id),
            "bm25": reference_eval.agreement(queries, bm25.search(texts, 3), by_id)}


def main(argv=None) -> int:
    return json_main(__doc__, add_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
