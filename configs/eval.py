"""The pinned evaluation setup (SPEC sections 5-6; DESIGN.md point 9): launch/evaluate.py.

    python launch/evaluate.py --config=configs/eval.py --config.model.hf_dir=runs/stage2/hf \
        --config.eval.sets.hotpotqa.index_dir=/data/index/hotpot_abstracts \
        --config.retriever.index_dir=/data/index/kilt_100w \
        --method=naive,rag,search --out=runs/eval/qwen

Per set: the authors' question file (from ../shared/reference, or $SEARCHER_REFERENCE), the
corpus its searches read and (empty: config.retriever.index_dir) the index built from it with
launch/build_index.py. For all: a dense retriever with bge-large-en-v1.5 (the query
instruction, CLS pooling, inner product over an exact index), top-5 passages per search, at most
9 retrievals, greedy decoding, the base prompt; EM, CEM (ACC_R) and F1, and ACC_L when a judge
is given (launch/evaluate.py --judge: gpt-4o-mini in the paper). The header of every results.md
prints what was used, and names an index whose encoder is not the pinned one.
"""
import os
import pathlib

from configs import base

REFERENCE = pathlib.Path(os.environ.get(
    "SEARCHER_REFERENCE", pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"))
EVAL_SET_DIR = REFERENCE / "r1searcher" / "eval_set"
HOTPOT_CORPUS = "HotpotQA Wikipedia abstracts (2017), 'Title: X Text: Y'"
KILT_CORPUS = "KILT Wikipedia (2019) in 100-word passages, '{title}   {chunk}'"


def get_config():
    config = base.get_config()
    config.retriever.update(backend="dense")
    # Greedy is how evaluate.py samples whatever the sampler section says (trainer.build_parts'
    # eval sampler); 9 retrievals and top 5 come from base.eval_rollout.
    config.eval = dict(
        methods="search",
        order="hotpotqa,twowiki,musique,bamboogle",   # the paper's
        encoder="bge-large-en-v1.5",
        corpus_note=("bge-large-en-v1.5, query instruction 'Represent this sentence for "
                     "searching relevant passages: ', CLS pooling, inner product, exact index"),
        sets=dict(
            # Keys are the command line's names (--config.eval.sets.twowiki.index_dir=...);
            # `name` is the table's.
            hotpotqa=dict(name="hotpotqa", file=str(EVAL_SET_DIR / "hotpotqa_500.jsonl"),
                          index_dir="", corpus=HOTPOT_CORPUS),
            twowiki=dict(name="2wiki", file=str(EVAL_SET_DIR / "2wiki_500.jsonl"),
                         index_dir="", corpus=KILT_CORPUS),
            musique=dict(name="musique", file=str(EVAL_SET_DIR / "musique_500.jsonl"),
                         index_dir="", corpus=KILT_CORPUS),
            bamboogle=dict(name="bamboogle", file=str(EVAL_SET_DIR / "bamboogle.jsonl"),
                           index_dir="", corpus=KILT_CORPUS),
        ),
    )
    return config
