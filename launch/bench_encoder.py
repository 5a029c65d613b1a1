"""Passage encoding: our JAX all-MiniLM-L6-v2 against transformers (PyTorch) on the same passages.

  python launch/benchmark.py --suite=encoder [-- --passages 1024 --batch_size 16]

Both sides sort the passages by length and encode them in batches of --batch_size (ours pads
each batch to a length bucket, transformers to the batch's longest text). Reported: passages/s
and real tokens/s of each, their ratio, the cosine between the two sides' vectors, and the
floor: the encoder's FLOPs on the real tokens over the matmul rate this machine reached on
the encoder's own FFN shape in the same run.
"""
import argparse
import json
import os
import pathlib
import sys

from bench_common import best_seconds, json_main

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "reference" / "corpus" / "hotpotqa_qwen.corpus.jsonl"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--passages", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=0, help="0: our encoder's default")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side (best is kept)")
    parser.add_argument("--out", default="")


def _flops_per_token(layers: int, h: int, f: int, seq_len: int) -> float:
    """Forward FLOPs per token: the six dense matmuls per layer, and attention over seq_len keys."""
    return layers * (2 * (4 * h * h + 2 * h * f) + 4 * seq_len * h)


def _matmul_rate(h: int, f: int, rows: int = 4096) -> float:
    """FLOP/s of a jitted [rows, h] x [h, f] matmul: the rate the FFN's dense layers can reach."""
    import jax
    import jax.numpy as jnp
    x, w = jnp.ones((rows, h)), jnp.ones((h, f))
    matmul = jax.jit(lambda x, w: x @ w)
    seconds = best_seconds(lambda: matmul(x, w).block_until_ready(), 10, warmups=1)
    return 2 * rows * h * f / seconds


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    import transformers
    from searcher_jax.retrieval import corpus_formats
    from searcher_jax.retrieval.encoder import TextEncoder, packaged_minilm_dir

    texts = [p.render() for _, p in zip(range(args.passages), corpus_formats.read_corpus(args.corpus))]
    ours = TextEncoder.load(max_length=args.max_length, batch_size=args.batch_size)
    batch_size = ours.batch_size
    ours_s = best_seconds(lambda: ours.encode_passages(texts), args.repeats, warmups=1)  # compiles the buckets
    ours_vectors = ours.encode_passages(texts)

    directory = packaged_minilm_dir()
    torch.set_num_threads(os.cpu_count())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    model = transformers.BertModel.from_pretrained(str(directory)).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    theirs_vectors = np.zeros_like(ours_vectors)

    def theirs():
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                batch = tokenizer([texts[r] for r in rows], padding=True, truncation=True,
                                  max_length=args.max_length, return_tensors="pt")
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
                theirs_vectors[rows] = pooled.numpy()

    theirs_s = best_seconds(theirs, args.repeats, warmups=1)

    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]]
    tokens = sum(lengths)
    cfg = model.config
    flops = float(sum(n * _flops_per_token(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, n)
                      for n in lengths))
    rate = _matmul_rate(cfg.hidden_size, cfg.intermediate_size)
    cosines = np.sum(ours_vectors * theirs_vectors, axis=1)
    result = {
        "suite": "encoder", "model": "all-MiniLM-L6-v2", "corpus": args.corpus, "passages": len(texts),
        "real_tokens": tokens, "mean_tokens": round(tokens / len(texts), 1), "batch_size": batch_size,
        "ours_jax": {"passages_per_s": round(len(texts) / ours_s, 1), "tokens_per_s": round(tokens / ours_s)},
        "transformers_torch": {"passages_per_s": round(len(texts) / theirs_s, 1),
                               "tokens_per_s": round(tokens / theirs_s), "threads": torch.get_num_threads()},
        "ours_over_transformers": round(theirs_s / ours_s, 2),
        "min_cosine": round(float(cosines.min()), 6),
        "floor": {"matmul_gflops": round(rate / 1e9, 1),
                  "passages_per_s_at_matmul_rate": round(len(texts) / (flops / rate), 1),
                  "ours_fraction": round(flops / rate / ours_s, 2),
                  "transformers_fraction": round(flops / rate / theirs_s, 2)},
        "cpu_count": os.cpu_count(),
    }
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    return json_main(__doc__, add_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
