"""Evaluation as the paper reports it (SPEC section 6): sets x methods, EM, CEM (ACC_R), F1,
ACC_L, retrievals per question, answered share; or the same table from existing records.

    # the four benchmarks with the pinned setup (configs/eval.py), three methods, a judge
    OPENAI_API_KEY=... python launch/evaluate.py --config=configs/eval.py \
        --config.model.hf_dir=runs/stage2/hf --config.retriever.index_dir=/data/index/kilt \
        --config.eval.sets.hotpotqa.index_dir=/data/index/hotpot \
        --method=naive,rag,search --judge=openai --judge_url=https://api.openai.com/v1 \
        --out=runs/eval/qwen
    # some sets only, or any question file (NAME=FILE or FILE)
    python launch/evaluate.py --config=configs/eval.py ... --sets=bamboogle,mine=q.jsonl
    # the table from records, no model: ours (a run's --out) or the authors' released traces;
    # written to runs/eval_from_traces unless --out is given (never over a run's results)
    python launch/evaluate.py --from_traces=../shared/reference/r1searcher/eval_results
    # the demo's world (no --config): its held-out questions, the world's base model
    python launch/evaluate.py --method=naive,rag,search --out=runs/eval/world

Writes <out>/records/<set>.<method>.jsonl (one line per question, the released traces' field
names), <out>/results.md and <out>/results.json (the table under a header that pins the setup:
model, decoding, retriever, top-k, retrieval limit, each set's file, corpus and index, the
judge; with the web backend, its counts of queries, pages, failures and timeouts), and with a
judge <out>/judge_cache.jsonl (a rerun asks nothing twice). The judge's API key is read from
the environment variable --judge_key_env names and is written nowhere; a key the endpoint
refuses (401/403) stops the run at once.
With --config.model.init_from=<a run's workdir> the params are that run's latest checkpoint.
"""

import cli  # the --config flag; puts the repository root on sys.path
from absl import app, flags

DEFAULT_OUT, FROM_TRACES_OUT = "runs/eval", "runs/eval_from_traces"
flags.DEFINE_string("out", "", "directory for records/, results.md, results.json (default "
                    f"{DEFAULT_OUT}; with --from_traces {FROM_TRACES_OUT}, so that a table "
                    "recomputed from records never overwrites an evaluation's results)")
flags.DEFINE_string("sets", "", "comma-separated sets: keys of config.eval.sets, NAME=FILE or "
                    "FILE (default: every configured set, else config.data.eval_file)")
flags.DEFINE_string("method", "", "comma-separated methods: naive, rag, search "
                    "(default: config.eval.methods, else search)")
flags.DEFINE_integer("limit", 0, "evaluate only the first N questions of each set (0: all)")
flags.DEFINE_integer("batch_size", 0, "rows per rollout (0: config.train.eval_batch_size)")
flags.DEFINE_list("from_traces", [], "record files or directories (a run's --out, or the "
                  "authors' eval_results): recompute the table from them, load no model")
flags.DEFINE_enum("judge", "none", ["none", "openai", "hf"], "the LLM judge of ACC_L")
flags.DEFINE_string("judge_url", "", "openai judge: base URL, e.g. https://api.openai.com/v1")
flags.DEFINE_string("judge_model", "gpt-4o-mini", "openai judge: the model name")
flags.DEFINE_string("judge_key_env", "OPENAI_API_KEY",
                    "openai judge: environment variable holding the API key ('' for none)")
flags.DEFINE_integer("judge_concurrency", 8, "openai judge: requests in flight")
flags.DEFINE_integer("judge_retries", 3, "openai judge: retries of a failed request")
flags.DEFINE_string("judge_hf_dir", "", "hf judge: a local HF causal LM directory")
flags.DEFINE_boolean("progress", True, "a progress bar per set and method (stderr)")


def judge_config():
    from searcher_jax import judge  # pylint: disable=import-outside-toplevel
    f = flags.FLAGS
    return judge.JudgeConfig(backend=f.judge, url=f.judge_url, model=f.judge_model,
                             key_env=f.judge_key_env, concurrency=f.judge_concurrency,
                             retries=f.judge_retries, hf_dir=f.judge_hf_dir)


def from_traces(paths, out: str) -> None:
    """The table of existing records (judged first when a judge is given: its verdicts replace
    the records' own), printed and written to <out>/results.md and results.json."""
    # pylint: disable=import-outside-toplevel
    from etils import epath

    from searcher_jax import eval_tables, judge
    cfg = judge_config()
    files = eval_tables.record_files(paths)
    groups = eval_tables.group_rows(files)
    setup = eval_tables.recorded_setup(paths) or [
        "recomputed from records whose setup this table cannot know"]
    verdicts = judge.make_judge(cfg)
    if verdicts is not None:
        cache = judge.VerdictCache(epath.Path(out) / judge.CACHE_FILE)
        for rows in groups.values():
            judge.judge_rows(rows, verdicts, cache)
        setup = [line for line in setup if not line.startswith("ACC_L judged again: ")]
        setup.append(f"ACC_L judged again: {cfg.describe()}")
    table = eval_tables.table_of(groups)
    print(eval_tables.write_results(out, table, "Evaluation (recomputed from records)", setup,
                                    records=files))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cli.quiet_logging()
    if f.from_traces:
        from_traces(f.from_traces, f.out or FROM_TRACES_OUT)
        return
    out = f.out or DEFAULT_OUT
    # pylint: disable=import-outside-toplevel
    import jax

    from searcher_jax import benchmarks, eval_tables, judge, trainer
    config = trainer.resolve_world(f.config)
    sets = benchmarks.parse_sets(f.sets, config)
    methods = benchmarks.parse_methods(f.method or benchmarks.eval_config(config).methods)
    cfg = judge_config()
    verdicts = judge.make_judge(cfg)   # before the model: a missing key fails in seconds
    with config.unlocked():
        config.data.eval_file = ""     # the sets are read by benchmarks, not build_parts
    parts, params = trainer.build_parts(config, with_train_questions=False)
    trainer.evaluated_params(config, parts, params)
    batch_size = f.batch_size or config.train.eval_batch_size
    retriever_for = benchmarks.set_retrievers(config, parts.retriever)
    table, judge_counts = benchmarks.evaluate_sets(
        parts, config, sets, methods, out, batch_size=batch_size, limit=f.limit,
        judge=verdicts, retriever_for=retriever_for, progress=f.progress)
    counts = {s.name: int(next(iter(table.values()))[s.name]["questions"]) for s in sets}
    notes = benchmarks.setup_notes(config, sets, methods, cfg.describe(), counts)
    if jax.process_index() == 0:
        records = [benchmarks.records_path(out, s.name, m) for s in sets for m in methods]
        print(eval_tables.write_results(out, table, "Evaluation", notes, records=records,
                                        retrieval_stats=retriever_for.stats() or None,
                                        judge_counts=judge_counts))


if __name__ == "__main__":
    cli.run(main)
