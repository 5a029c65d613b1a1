"""Agreement with the authors' retriever on the reference queries (reference/corpus/*.questions.jsonl).

Each query the released model wrote comes with the passages the authors' retriever returned
(bge-large-en-v1.5, exact inner product, top 5 in evaluation). Two numbers per retriever:
  top1_in_top3:  our top-3 holds the passage the authors' retriever ranked first
  answer_in_top3: our top-3 holds the gold answer (normalised substring), next to the same for
                  the authors' own top-3
"""
import dataclasses
import json
import pathlib
import re
import string
from typing import Sequence

from searcher_jax.retrieval.passage import Passage

_PUNCTUATION = frozenset(string.punctuation)
AUTHORS_TOP_K = 5  # the released evaluation runs retrieved 5 passages per query


@dataclasses.dataclass(frozen=True)
class ReferenceQuery:
    query: str
    answer: str
    authors_doc_ids: tuple[str, ...]  # in the authors' rank order


def load_reference_queries(questions_file: str | pathlib.Path) -> list[ReferenceQuery]:
    out = []
    with open(questions_file, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            ids = row["retrieved_doc_ids"]
            if len(ids) != AUTHORS_TOP_K * len(row["queries"]):
                raise ValueError(f"{questions_file}: question {row['qidx']} has {len(row['queries'])} queries "
                                 f"but {len(ids)} retrieved ids")
            for j, query in enumerate(row["queries"]):
                out.append(ReferenceQuery(query, row["answer"],
                                          tuple(ids[j * AUTHORS_TOP_K:(j + 1) * AUTHORS_TOP_K])))
    return out


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the usual QA normalisation)."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def holds_answer(passages: Sequence[Passage], answer: str) -> bool:
    target = normalize(answer)
    return bool(target) and any(target in normalize(p.render()) for p in passages)


def agreement(queries: Sequence[ReferenceQuery], ours: Sequence[Sequence[Passage]],
              by_id: dict[str, Passage], k: int = 3) -> dict:
    """ours[i]: our ranked passages for queries[i] (at least k); by_id: the corpus by passage id."""
    top1 = answer_ours = answer_authors = 0
    for q, found in zip(queries, ours, strict=True):
        found = list(found)[:k]
        top1 += q.authors_doc_ids[0] in {p.id for p in found}
        answer_ours += holds_answer(found, q.answer)
        answer_authors += holds_answer([by_id[i] for i in q.authors_doc_ids[:k]], q.answer)
    n = max(len(queries), 1)
    return {"queries": len(queries), "top1_in_top3": top1 / n, "answer_in_top3": answer_ours / n,
            "authors_answer_in_top3": answer_authors / n}
