"""Corpus in, index directory out (the layout is in searcher_jax/retrieval/retriever.py).

  python launch/build_index.py --corpus wiki.tsv --out /data/index [--backends dense,bm25]
      [--encoder_dir /models/bge-large-en-v1.5] [--ram_budget_gb 40] [--cpu]

Dense encoding writes resumable shards under OUT/embeddings: rerun the same command after an
interruption and it continues. --cpu runs JAX on the host (beside a trainer that holds the
accelerator). Ends with a summary: passages, dimensions, build time, bytes, the index type
ScaNN actually built and its recall@10 against exact search.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", nargs="+", required=True,
                        help="corpus files: .tsv (id<TAB>passage) or .jsonl (KILT pages, FlashRAG, plain)")
    parser.add_argument("--out", required=True, help="index directory to write")
    parser.add_argument("--backends", default="dense", help="comma-separated: dense, bm25")
    parser.add_argument("--encoder_dir", default="", help="local HF BERT directory (default: packaged MiniLM)")
    parser.add_argument("--family", default="", help="bge | e5 | minilm (default: guessed from the directory)")
    parser.add_argument("--max_length", type=int, default=0, help="encoder max tokens (default: the family's)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="texts per encoder call (0: 16 per CPU device, 64 per accelerator)")
    parser.add_argument("--shard_size", type=int, default=65_536, help="passages per resumable embedding shard")
    parser.add_argument("--index_kind", default="auto", help="auto | brute_force | tree_ah")
    parser.add_argument("--brute_force_below", type=int, default=20_000)
    parser.add_argument("--num_leaves", type=int, default=0)
    parser.add_argument("--leaves_to_search_fraction", type=float, default=0.1)
    parser.add_argument("--reorder_dtype", default="float32", help="float32 | bfloat16 | int8 | none")
    parser.add_argument("--pca_dims", type=int, default=0,
                        help="PCA width for the tree and AH codes (0: none; 160 for 384-d MiniLM, README)")
    parser.add_argument("--spill_threshold", type=float, default=0.0,
                        help="> 0: each query searches the leaves scoring within this of its best leaf, "
                             "at most --leaves_to_search_fraction of them (0: always that many)")
    parser.add_argument("--ram_budget_gb", type=float, default=0.0,
                        help="choose the most accurate layout whose vectors fit this many GB")
    parser.add_argument("--recall_queries", type=int, default=1000,
                        help="corpus vectors used as queries to measure recall@10 against exact search")
    parser.add_argument("--cpu", action="store_true", help="set JAX_PLATFORMS=cpu (encode on the host)")
    parser.add_argument("--no_progress", action="store_true")


def build(args: argparse.Namespace) -> dict:
    """Builds the index directory and returns the summary (also written to OUT/index.json)."""
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    from searcher_jax.retrieval import bm25, corpus_formats, corpus_store, dense_index, scann_kernels

    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - {"dense", "bm25"}
    if unknown or not backends:
        raise ValueError(f"--backends must name dense and/or bm25, got {args.backends!r}")
    progress = not args.no_progress
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def passages():
        for path in args.corpus:
            yield from corpus_formats.read_corpus(path)

    num = corpus_store.write_store(passages(), out / "corpus", progress=progress)
    if num == 0:
        raise ValueError(f"no passages in {args.corpus}")
    store = corpus_store.CorpusStore(out / "corpus")
    summary = {"corpus": [str(p) for p in args.corpus], "passages": num, "backends": backends,
               "corpus_bytes": dense_index.directory_bytes(out / "corpus"), "encoder": None}
    timings = {"corpus_s": time.perf_counter() - start}

    if "bm25" in backends:
        t = time.perf_counter()
        bm25.BM25Index.build(store, progress=progress).save(out / "bm25")
        timings["bm25_s"] = time.perf_counter() - t
        summary["bm25_bytes"] = dense_index.directory_bytes(out / "bm25")

    if "dense" in backends:
        from searcher_jax.retrieval import embeddings
        from searcher_jax.retrieval.encoder import TextEncoder
        t = time.perf_counter()
        encoder = TextEncoder.load(args.encoder_dir or None, family=args.family or None,
                                   max_length=args.max_length or None, batch_size=args.batch_size)
        embeddings.encode_store(store, encoder, out / "embeddings", shard_size=args.shard_size, progress=progress)
        vectors = embeddings.load_embeddings(out / "embeddings")  # [N, D]
        timings["encode_s"] = time.perf_counter() - t
        cfg = dense_index.IndexConfig(kind=args.index_kind, brute_force_below=args.brute_force_below,
                                      num_leaves=args.num_leaves,
                                      leaves_to_search_fraction=args.leaves_to_search_fraction,
                                      reorder_dtype=args.reorder_dtype, pca_dims=args.pca_dims,
                                      spill_threshold=args.spill_threshold)
        if args.ram_budget_gb:
            cfg = dense_index.layout_for_budget(num, vectors.shape[1], args.ram_budget_gb * 1e9, cfg)
        index, timings["index_s"] = dense_index.timed_build(vectors, cfg)
        dense_bytes = index.save(out / "dense")
        sample = np.random.default_rng(0).choice(num, size=min(args.recall_queries, num), replace=False)
        queries = vectors[np.sort(sample)]
        k = min(10, num)
        recall = dense_index.recall_at_k(index.search(queries, k)[0], dense_index.exact_search(vectors, queries, k))
        summary.update({
            "dim": int(vectors.shape[1]), "index_config": dataclasses.asdict(cfg), "index_type": index.built_type,
            "scann_kernels": "avx2" if scann_kernels.avx2_enabled() else "scann's own choice",
            "dense_bytes": dense_bytes, "dense_bytes_per_million_passages": dense_bytes / num * 1e6,
            "planned_bytes_per_million_passages": dense_index.planned_bytes_per_passage(
                vectors.shape[1], cfg, num) * 1e6,
            "recall_at_10_vs_exact": recall, "recall_queries": len(sample),
            "encoder": {"dir": str(pathlib.Path(args.encoder_dir).resolve()) if args.encoder_dir else "",
                        "family": args.family or _family_of(args.encoder_dir),
                        "max_length": encoder.spec.max_length}})
    summary["timings_s"] = {name: round(v, 2) for name, v in timings.items()}
    summary["build_s"] = round(time.perf_counter() - start, 2)
    (out / "index.json").write_text(json.dumps(summary, indent=1))
    return summary


def _family_of(encoder_dir: str) -> str:
    from searcher_jax.retrieval.encoder import guess_family, packaged_minilm_dir
    return guess_family(pathlib.Path(encoder_dir) if encoder_dir else packaged_minilm_dir())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    from searcher_jax.retrieval.corpus_formats import CorpusFormatError
    try:
        summary = build(args)
    except (CorpusFormatError, FileNotFoundError, ValueError) as e:
        print(f"build_index: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
