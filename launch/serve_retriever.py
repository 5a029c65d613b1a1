"""Serves an index directory over HTTP for R1-Searcher (POST /queries) and Search-R1
(POST /retrieve) clients, unchanged.

  python launch/serve_retriever.py --index_dir /data/index [--backend dense|bm25]
      [--host 127.0.0.1] [--port 8000] [--cpu]

Starlette on uvicorn (searcher_jax/retrieval/server.py); SIGINT or SIGTERM stops it gracefully,
exit status 0. An index that is missing or lacks the backend, or a port taken, is a message
and exit status 2.

Binds loopback by default; pass --host 0.0.0.0 deliberately to serve other machines.
"""
import argparse
import os
import signal
import sys

from searcher_jax.retrieval.server import RetrievalServer, ServerLimits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index_dir", required=True)
    parser.add_argument("--backend", default="dense", choices=["dense", "bm25"])
    parser.add_argument("--encoder_dir", default="", help="override the encoder recorded in index.json")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_queries", type=int, default=1024, help="per request and per batched search")
    parser.add_argument("--max_k", type=int, default=100)
    parser.add_argument("--max_body_bytes", type=int, default=ServerLimits.max_body_bytes,
                        help="larger request bodies are refused with 413")
    parser.add_argument("--request_read_timeout_s", type=float, default=ServerLimits.request_read_timeout_s,
                        help="a request not wholly received by then has its connection closed")
    parser.add_argument("--encoder_batch_size", type=int, default=0, help="0: the encoder's default")
    parser.add_argument("--cpu", action="store_true", help="set JAX_PLATFORMS=cpu")
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    from searcher_jax.retrieval.retriever import RetrieverConfig, make_backend

    try:
        retriever = make_backend(RetrieverConfig(backend=args.backend, index_dir=args.index_dir,
                                                 encoder_dir=args.encoder_dir,
                                                 encoder_batch_size=args.encoder_batch_size))
    except (FileNotFoundError, ValueError) as e:  # no index.json, a backend it was not built with
        parser.error(str(e))
    try:
        server = RetrievalServer(retriever, host=args.host, port=args.port,
                                 limits=ServerLimits(max_queries=args.max_queries, max_k=args.max_k,
                                                     max_body_bytes=args.max_body_bytes,
                                                     request_read_timeout_s=args.request_read_timeout_s),
                                 num_passages=len(retriever.store))
    except OSError as e:  # the port taken, an address not of this machine
        parser.error(f"cannot listen on {args.host}:{args.port}: {e}")
    # uvicorn stops gracefully on SIGTERM, then raises it again under the handler it found: by
    # default that kills the process (status 143) before `server.stop()` below. As SIGINT does,
    # it ends serve_forever with KeyboardInterrupt instead.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"serving {args.index_dir} ({args.backend}, {len(retriever.store)} passages) at {server.url}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
