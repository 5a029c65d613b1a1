"""The paper's evaluation (SPEC sections 5-6): several question sets, several methods, one table.

    table = evaluate_sets(parts, config, sets, ["naive", "rag", "search"], out_dir,
                          batch_size=64)

Methods are policies.py's policies, one implementation for the demo's comparison and for this:

    naive   no retrieval: the prompt, then a forced opening that ends where the answer is
            written (`EvalConfig.naive_opening`), searches disabled;
    rag     standard RAG: the question searched once, its documents put in the prompt
            before the question (`prompts.rag_question`), nothing forced, searches disabled;
    search  the prompt alone: the policy searches as it learned to.

Every method runs the same model, prompt style, sampler (greedy) and rollout config
(`eval_rollout`: 9 retrievals, top 5 in configs/base.py). Per set and method the records go to
`<out>/records/<set>.<method>.jsonl` (evaluation.Record's fields, in the released traces' names,
plus set, method, retrievals, what the method put around the question (`record_row`) and the
judge's verdict), and the run's table, computed from those rows by eval_tables (so
`--from_traces <out>` recomputes it), to `<out>/results.md` and `results.json`, headed by the
pinned setup (`setup_notes`): two tables are comparable, or visibly not.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import tqdm
from etils import epath

from searcher_jax import eval_tables, judge as judge_lib, policies, run_config, trainer
from searcher_jax.data.questions import split_spec
from searcher_jax.retrieval import process_zero
from searcher_jax.retrieval import retriever as retriever_lib

METHODS = {"naive": policies.NAIVE, "rag": policies.RAG, "search": policies.SEARCH}
# A real model's naive opening (the synthetic world's base model has its own, `naive_opening`):
# it closes the reasoning where the prompt's format puts the answer next; the model writes the
# answer tags itself (a forced text is prompt, and only the policy's text is read).
NAIVE_OPENING = " I will answer from what I know, without searching.</think>\n\n"


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One benchmark: its question file and what its searches read.

    name: the set's name in tables and file names.
    file: a question file read_questions reads (data/questions.py).
    index_dir: its retrieval index ("" : config.retriever.index_dir).
    corpus: what the index holds, in words, for the table's header.
    """
    name: str
    file: str
    index_dir: str = ""
    corpus: str = ""

    def __post_init__(self):
        if not self.name or any(c in self.name for c in "/\\. ") or not self.file:
            raise ValueError(f"eval set {self.name!r}: needs a name without '/', '.' or spaces, "
                             f"and a question file (got {self.file!r})")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """config.eval (configs/eval.py), less its `sets`."""
    methods: str = "search"          # comma-separated METHODS
    order: str = ""                  # comma-separated keys of `sets`: the default sets' order
    naive_opening: str = NAIVE_OPENING
    encoder: str = ""                # the pinned encoder (a note flags an index built otherwise)
    corpus_note: str = ""            # e.g. the retriever's query instruction and pooling
    metrics: str = ("EM, CEM (ACC_R) and F1 of pred_ans against every gold (max), the released "
                    "evaluation's normalisation (SPEC section 3)")


def eval_config(config) -> EvalConfig:
    section = dict(config.get("eval", {}) or {})
    section.pop("sets", None)
    return run_config.build(EvalConfig, section, "eval")


def configured_sets(config) -> dict[str, EvalSet]:
    """config.eval.sets: {key: EvalSet}, the set's name its `name` field or else its key; in
    config.eval.order, then the others by key (a ConfigDict keeps no insertion order)."""
    sets = dict((config.get("eval", {}) or {}).get("sets", {}) or {})
    order = [k for k in eval_config(config).order.split(",") if k]
    unknown = [k for k in order if k not in sets]
    if unknown:
        raise ValueError(f"config.eval.order names {unknown}, not keys of config.eval.sets "
                         f"({sorted(sets)})")
    out = {}
    for key in order + sorted(k for k in sets if k not in order):
        fields = dict(sets[key])
        fields.setdefault("name", key)
        out[key] = run_config.build(EvalSet, fields, f"eval.sets.{key}")
    return out


def parse_sets(spec: str, config) -> list[EvalSet]:
    """The sets a --sets value names, comma-separated: a key (or name) of config.eval.sets,
    NAME=FILE, a question FILE (named by its stem) or DIR:SPLIT (named by its split).
    "" : every configured set, or else config.data.eval_file as the set "eval".
    Raises ValueError for an unknown name, two sets of one name, or nothing to evaluate."""
    configured = configured_sets(config)
    configured.update({s.name: s for s in list(configured.values())})  # by key or by name
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        if configured:
            return list(configured_sets(config).values())
        eval_file = run_config.data_config(config).eval_file
        if not eval_file:
            raise ValueError("nothing to evaluate: give --sets, or a config with eval.sets or "
                             "data.eval_file")
        return [EvalSet("eval", eval_file)]
    out = []
    for item in items:
        if item in configured:
            out.append(configured[item])
        elif "=" in item:
            name, _, file = item.partition("=")
            out.append(EvalSet(name.strip(), file.strip()))
        elif split_spec(item) is not None:   # DIR:SPLIT of a question_records dataset
            out.append(EvalSet(split_spec(item)[1], item))
        elif epath.Path(item).exists():
            out.append(EvalSet(epath.Path(item).stem, item))
        else:
            raise ValueError(f"--sets: {item!r} is neither a configured set "
                             f"({sorted(configured)}) nor NAME=FILE nor an existing file")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--sets: two sets share a name: {names}")
    return out


def parse_methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--method: {unknown or spec!r}; choose from {sorted(METHODS)}")
    return list(dict.fromkeys(methods))


def naive_opening(config) -> str:
    """The naive method's forced opening: the synthetic world's base model's no-search mode (as
    the demo's comparison uses), else config.eval's."""
    if run_config.world_source(config).dir:
        # pylint: disable-next=import-outside-toplevel
        from searcher_jax.synthetic import reading
        return reading.CLOSED_BOOK
    return eval_config(config).naive_opening


def policy_for(method: str, config) -> policies.Policy:
    return policies.Policy(method, METHODS[method], naive_opening=naive_opening(config))


def _encoder_of(index_dir: str) -> str:
    try:
        meta = retriever_lib.read_index_meta(index_dir)
    except (FileNotFoundError, OSError, ValueError):
        return "unknown (no index.json)"
    encoder = meta.get("encoder")
    if not encoder:
        return "none (" + "+".join(meta.get("backends", [])) + " index)"
    return f"{encoder.get('family', '?')} {encoder.get('dir') or '(packaged)'}, " \
           f"max_length {encoder.get('max_length', '?')}"


def setup_notes(config, sets: Sequence[EvalSet], methods: Sequence[str], judge_line: str,
                questions: Mapping[str, int] | None = None) -> list[str]:
    """The table's header: everything that decides the numbers, one line each."""
    cfg = eval_config(config)
    retrieval = run_config.retriever_config(config)
    rollout = run_config.eval_rollout_config(config)
    sampler = run_config.sampler_config(config)
    data = run_config.data_config(config)
    model = run_config.model_source(config)
    notes = [
        f"model: {model.hf_dir}" + (f", params from {model.init_from}" if model.init_from else "")
        + f"; prompt style {data.prompt_style}; greedy decoding, buffer {sampler.max_len} "
          f"tokens, segments of {sampler.segment_len}",
        f"retrieval: {retrieval.backend} backend, top-{rollout.top_k} passages per search, at "
        f"most {rollout.max_retrievals} retrievals per question" + (
            f" ({cfg.corpus_note})" if cfg.corpus_note else ""),
        f"methods: {', '.join(methods)} (naive: forced opening {naive_opening(config)!r}, no "
        f"search; rag: the question searched once, its documents in the prompt before the "
        f"question, no search after; search: the policy's own searches)",
        f"metrics: {cfg.metrics}; {judge_line}",
    ]
    for s in sets:
        index_dir = s.index_dir or retrieval.index_dir
        if retrieval.backend == "web":
            where = (f"web search {retrieval.web_search_url} (site:{retrieval.web_site}), top "
                     f"{retrieval.web_pages} pages summarised by {retrieval.web_llm_model}, "
                     f"{retrieval.web_documents} summaries kept")
            encoder = "-"
        elif retrieval.backend == "http":
            where, encoder = retrieval.url, "the server's"
        else:
            where, encoder = index_dir or "-", _encoder_of(index_dir)
        count = f", {questions[s.name]} questions" if questions and s.name in questions else ""
        line = (f"set {s.name}: {s.file}{count}; corpus: {s.corpus or '-'}; index: {where}; "
                f"encoder: {encoder}")
        if cfg.encoder and retrieval.backend == "dense" and cfg.encoder not in encoder:
            line += f" — NOT the pinned encoder {cfg.encoder}: not comparable"
        notes.append(line)
    return notes


def record_row(record: policies.PolicyRecord, set_name: str, method: str) -> dict[str, Any]:
    """One record file line: evaluation.Record's fields plus set, method, retrievals and what
    the method put around the question, so that the row's prompt can be rebuilt: the prompt
    style's prompt of `prompt_documents + question`, then `forced_prefix`.

    prompt_documents: RAG's documents block, before the question in the prompt ("" otherwise).
    forced_prefix: naive's opening, tokenized after the prompt before gen_text_store ("" else).
    """
    row = dataclasses.asdict(record.record)
    row.update(set=set_name, method=method, retrievals=record.retrievals,
               prompt_documents=record.prompt_documents, forced_prefix=record.forced)
    return row


def write_rows(path, rows: Sequence[Mapping]) -> None:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def records_path(out_dir, set_name: str, method: str) -> epath.Path:
    return epath.Path(out_dir) / eval_tables.RECORDS_DIR / f"{set_name}.{method}.jsonl"


class SetRetrievers:
    """EvalSet -> its retriever: `default` (the run's), or one built for the set's own
    index_dir (once per directory); `stats()` sums the counts the retrievers keep."""

    def __init__(self, config, default):
        self._base = run_config.retriever_config(config)
        self.built = {self._base.index_dir: default}

    def __call__(self, eval_set: EvalSet):
        index_dir = eval_set.index_dir or self._base.index_dir
        if index_dir not in self.built:
            self.built[index_dir] = retriever_lib.make_retriever(
                dataclasses.replace(self._base, index_dir=index_dir))
        return self.built[index_dir]

    def stats(self) -> dict[str, int]:
        """`retrieval_stats` of the retrievers built so far."""
        return retrieval_stats(self.built.values())


def retrieval_stats(retrievers) -> dict[str, int]:
    """The counts of the retrievers that keep some (the web backend's `stats`: queries, pages,
    summaries, failures, timeouts, deadline_exceeded), summed; {} when none does. A process-0
    retriever's are its backend's (on process 0; none on the others)."""
    total: dict[str, int] = {}
    for retriever in retrievers:
        backend = getattr(retriever, "inner", retriever)
        for name, count in (getattr(backend, "stats", None) or {}).items():
            total[name] = total.get(name, 0) + int(count)
    return total


def set_retrievers(config, default) -> SetRetrievers:
    """EvalSet -> its retriever (SetRetrievers): `default` (the run's), or one built for the
    set's own index_dir (once per directory)."""
    return SetRetrievers(config, default)


def judge_on_process_zero(rows: list[dict], judge, cache, process_index: int,
                          process_count: int,
                          broadcast: Callable[[bytes], bytes] = process_zero.broadcast_bytes
                          ) -> dict[str, int] | None:
    """Process 0 asks the judge (it alone writes the verdict cache) and gets the counts of
    judge.judge_rows; the others get None. An error that stops process 0 (a refused key) is
    broadcast and raised on every process, so that none is left waiting in the next
    evaluation's collectives. Raises: that error on process 0, RuntimeError naming it on
    the others."""
    def decode(failure: bytes) -> None:
        if failure:
            raise RuntimeError(f"the judge on process 0 failed: {failure.decode()}")
    return process_zero.agreed_call(
        lambda: judge_lib.judge_rows(rows, judge, cache), process_index,
        broadcast if process_count > 1 else (lambda payload: payload),
        encode=lambda _, error: error.encode(), decode=decode)


def evaluate_sets(parts: trainer.Parts, config, sets: Sequence[EvalSet], methods: Sequence[str],
                  out_dir, *, batch_size: int, limit: int = 0, judge=None,
                  retriever_for: Callable[[EvalSet], Any] | None = None,
                  progress: bool = True) -> tuple[dict, dict[str, dict[str, int]]]:
    """Runs every method on every set; writes each set's records; returns (the table
    {method: {set: summary}} of eval_tables.summarize_rows, judge counts by "set.method").

    parts: trainer.build_parts of the (world-resolved) config; its eval_sampler (greedy) holds
      the policy's params. judge: judge.make_judge's, or None; verdicts are cached in
      `<out_dir>/judge_cache.jsonl` (process 0 asks, as it alone writes).
    limit: the first N questions of each set (0: all).
    Raises ValueError for a set whose questions all have prompts over data.max_prompt_len.
    """
    data = run_config.data_config(config)
    rollout_config = run_config.eval_rollout_config(config)
    reward_config = run_config.reward_config(config)
    encode = trainer.encode_prompt_fn(parts.tokenizer, data.prompt_style)
    retriever_for = retriever_for or set_retrievers(config, parts.retriever)
    cache = judge_lib.VerdictCache(epath.Path(out_dir) / judge_lib.CACHE_FILE) if judge else None
    writer = jax.process_index() == 0
    groups, judge_counts = {}, {}
    for eval_set in sets:
        questions = trainer.load_questions(eval_set.file, parts.tokenizer, data.prompt_style,
                                           data.max_prompt_len)[:limit or None]
        retriever = retriever_for(eval_set)
        for method in methods:
            with tqdm.tqdm(total=len(questions), desc=f"{eval_set.name} {method}", unit="q",
                           disable=not (progress and writer), file=sys.stderr) as bar:
                records = policies.evaluate_policy(
                    policy_for(method, config), parts.eval_sampler, parts.tokenizer, retriever,
                    questions, encode, batch_size, rollout_config, reward_config,
                    eos_ids=parts.eos_ids, record_titles=False, on_batch=bar.update)
            rows = [record_row(r, eval_set.name, method) for r in records]
            if judge is not None:
                counts = judge_on_process_zero(rows, judge, cache, jax.process_index(),
                                               jax.process_count())
                if writer:
                    judge_counts[f"{eval_set.name}.{method}"] = counts
            if writer:
                write_rows(records_path(out_dir, eval_set.name, method), rows)
            groups[(eval_set.name, method)] = rows
    return eval_tables.table_of(groups), judge_counts
