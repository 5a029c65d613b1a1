"""Builds the synthetic world, its tokenizer, its tiny base model and its index into one directory.

    <root>/world/      corpus.jsonl, train.jsonl, eval.jsonl
    <root>/tokenizer/  a HF tokenizer directory
    <root>/model/      a HF checkpoint directory (config.json with model_type qwen2,
                       model.safetensors, the tokenizer files, pretrain_log.json)
    <root>/index/      the corpus store and a BM25 index (launch/build_index.py's layout)
    <root>/reading/    reading.json: the model's reading F1 on this world's questions

Each stage writes a fingerprint of the configs it depends on; a stage whose
fingerprint matches is reused, so rebuilding with an unchanged config costs
nothing, and a changed config rebuilds only the stages it affects. The
tokenizer and the model depend on the pretraining config and the world's
behaviour shares only (`model_payload`), never on its seed or names: they are
trained on fresh-entity text (synthetic/fresh.py), and the presets' model is
committed (PACKAGED_MODEL_DIR), so any world seed builds in seconds.
"""
import dataclasses
import hashlib
import json
import pathlib
import shutil
import time
from typing import Callable

import numpy as np
from flax import nnx

from searcher_jax.model import hf_io
from searcher_jax.model.decoder import Decoder
from searcher_jax.retrieval import bm25, corpus_formats, corpus_store
from searcher_jax.synthetic import fresh
from searcher_jax.synthetic import names
from searcher_jax.synthetic import pretrain as pretrain_lib
from searcher_jax.synthetic import reading
from searcher_jax.synthetic import tokenizer as tokenizer_lib
from searcher_jax.synthetic import world as world_lib
from searcher_jax.synthetic import world_files

# Bump when the generator's output changes for the same config, so old builds are redone.
FORMAT_VERSION = 8
FINGERPRINT_FILE = "fingerprint.json"
READING_FILE = "reading.json"
_READING_QUESTIONS = 48
# Part of the reading stage's fingerprint: bump it when the probe measures differently, so
# a cached number is not reused (2: hf_io.load_tokenizer's fix, which changed every score).
_READING_PROBE_VERSION = 2
_TOKENIZER_TEXTS = 2000   # a sample of the pretraining texts is enough for BPE merges
PRETRAIN_LOG_FILE = "pretrain_log.json"

# Both presets share one base model (PretrainConfig's defaults: the committed one); they
# differ in the world's size.
PRESETS = {
    # The tests' and the demo's world: small enough for an RL step in seconds on 2 cores.
    "ci": (world_lib.WorldConfig(num_places=24, num_people=96, num_organisations=24,
                                 num_works=48, num_train_questions=200, num_eval_questions=64),
           pretrain_lib.PretrainConfig()),
    # A larger world of the same kind: WorldConfig's defaults.
    "demo": (world_lib.WorldConfig(), pretrain_lib.PretrainConfig()),
}


@dataclasses.dataclass(frozen=True)
class WorldPaths:
    """Where a build puts each file."""
    root: pathlib.Path

    @property
    def world_dir(self) -> pathlib.Path:
        return self.root / "world"

    @property
    def corpus(self) -> pathlib.Path:
        return self.world_dir / world_files.CORPUS_FILE

    @property
    def train_questions(self) -> pathlib.Path:
        return self.world_dir / world_files.TRAIN_FILE

    @property
    def eval_questions(self) -> pathlib.Path:
        return self.world_dir / world_files.EVAL_FILE

    @property
    def tokenizer_dir(self) -> pathlib.Path:
        return self.root / "tokenizer"

    @property
    def model_dir(self) -> pathlib.Path:
        return self.root / "model"

    @property
    def reading_dir(self) -> pathlib.Path:
        """The base model's reading F1 on this world (READING_FILE)."""
        return self.root / "reading"

    @property
    def index_dir(self) -> pathlib.Path:
        """A retrieval index directory (launch/build_index.py's layout) with a BM25 backend."""
        return self.root / "index"


def fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_stage(directory: pathlib.Path, payload: dict,
                make: Callable[[pathlib.Path], None], log: Callable[[str], None]) -> None:
    """Reuses `directory` if its fingerprint matches `payload`, else rebuilds it via `make`."""
    expected = fingerprint(payload)
    record = directory / FINGERPRINT_FILE
    if record.exists() and json.loads(record.read_text())["fingerprint"] == expected:
        log(f"reusing {directory} (fingerprint {expected})")
        return
    if directory.exists() and any(directory.iterdir()) and not record.exists():
        raise FileExistsError(f"{directory} exists and was not written by this build (no "
                              f"{FINGERPRINT_FILE}); refusing to replace it")
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start = time.time()
    make(partial)
    (partial / FINGERPRINT_FILE).write_text(
        json.dumps({"fingerprint": expected, "payload": payload}, indent=2, sort_keys=True))
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    log(f"built {directory} in {time.time() - start:.1f}s")


# The base model of the embedded world, built by `launch/pretrain_world.py --package` and
# committed: a build whose model payload has this fingerprint copies it instead of training.
PACKAGED_MODEL_DIR = pathlib.Path(__file__).resolve().parent / "base_model"
# The WorldConfig fields that shape the base model's behaviour (its demonstrations): the
# model depends on these and on the PretrainConfig, not on the world's names or seed.
BEHAVIOUR_FIELDS = ("kind_weights", "demo_top_k", "p_rag", "p_no_search", "p_poor_query",
                    "p_wrong_answer", "p_one_hop")


def model_payload(world_config: world_lib.WorldConfig,
                  pretrain_config: pretrain_lib.PretrainConfig) -> dict:
    """What the base model (and its tokenizer) is a pure function of."""
    behaviour = {name: getattr(world_config, name) for name in BEHAVIOUR_FIELDS}
    return {"version": FORMAT_VERSION, "behaviour": behaviour,
            "pretrain": dataclasses.asdict(pretrain_config)}


def packaged_model(payload: dict) -> pathlib.Path | None:
    """The committed base model if it was built from `payload`, else None."""
    record = PACKAGED_MODEL_DIR / FINGERPRINT_FILE
    if record.exists() and json.loads(record.read_text())["fingerprint"] == fingerprint(payload):
        return PACKAGED_MODEL_DIR
    return None


def pretraining_texts(world_config: world_lib.WorldConfig,
                      config: pretrain_lib.PretrainConfig) -> list[dict]:
    """The base model's training text: fresh-entity demonstrations, reading drills and
    single-lookup drills."""
    return list(fresh.fresh_texts(world_config, world_files.reserved_text(), config.num_demos,
                                  config.num_drills, config.drill_lookups,
                                  config.texts_per_part, config.seed,
                                  num_short_drills=config.num_short_drills))


def _make_tokenizer(rows: list[dict], config: pretrain_lib.PretrainConfig,
                    directory: pathlib.Path) -> None:
    texts = [row["text"] for row in rows[::max(1, len(rows) // _TOKENIZER_TEXTS)]]
    whole_words = names.LEXICON + tuple(str(year) for year in world_lib.YEARS)
    tokenizer_lib.save_tokenizer(
        tokenizer_lib.train_tokenizer(texts, config.vocab_size, whole_words), directory)


def _make_model(rows: list[dict], tokenizer_dir: pathlib.Path,
                config: pretrain_lib.PretrainConfig, log: Callable[[str], None],
                directory: pathlib.Path) -> None:
    tokenizer = hf_io.load_tokenizer(tokenizer_dir)
    eos = tokenizer.eos_token_id
    demo_ids = tokenizer([row["text"] for row in rows if row["kind"] == "demo"])["input_ids"]
    drill_ids = tokenizer([row["text"] for row in rows
                           if row["kind"] == fresh.DRILL])["input_ids"]
    demos, num_cut = pretrain_lib.demo_rows(demo_ids, eos, config.seq_len)
    stream = pretrain_lib.passage_stream(drill_ids, eos)
    short, short_cut = pretrain_lib.demo_rows(
        tokenizer([row["text"] for row in rows if row["kind"] == fresh.SHORT_DRILL])["input_ids"],
        eos, config.short_seq_len)
    model = Decoder(config.model_config(len(tokenizer), eos), rngs=nnx.Rngs(config.seed))
    start = time.time()
    losses = pretrain_lib.pretrain(model, demos, stream, short, config, log)
    seconds = time.time() - start
    hf_io.save_pretrained(model, directory, eos_ids=[eos])
    for path in tokenizer_dir.iterdir():
        if path.name != FINGERPRINT_FILE:
            shutil.copy(path, directory / path.name)
    (directory / PRETRAIN_LOG_FILE).write_text(json.dumps(dict(
        num_params=model.config.num_params, train_seconds=round(seconds, 1),
        num_demos=len(demo_ids), demos_cut_at_seq_len=num_cut,
        demo_tokens_mean=float(np.mean([len(ids) for ids in demo_ids])),
        drill_tokens=int(stream.shape[0]), short_drills=int(short.tokens.shape[0]),
        short_drills_cut=short_cut,
        loss_first=losses[0], loss_last_10_mean=float(np.mean(losses[-10:])),
        losses_every_10=losses[::10]), indent=2))


def _copy_packaged(keep: Callable[[str], bool], directory: pathlib.Path) -> None:
    for path in PACKAGED_MODEL_DIR.iterdir():
        if path.name != FINGERPRINT_FILE and keep(path.name):
            shutil.copy(path, directory / path.name)


def build(root: pathlib.Path, world_config: world_lib.WorldConfig,
          pretrain_config: pretrain_lib.PretrainConfig,
          log: Callable[[str], None] = print, use_packaged: bool = True) -> WorldPaths:
    """Builds (or reuses) world, tokenizer, model and index under `root`.

    The tokenizer and the model depend only on `model_payload` (not on the world's seed,
    names or sizes); with `use_packaged`, a payload matching the committed base model's
    fingerprint copies it (seconds) instead of training it (PACKAGED_MODEL_DIR).
    """
    paths = WorldPaths(pathlib.Path(root))
    world_payload = {"version": FORMAT_VERSION, "world": dataclasses.asdict(world_config)}
    build_stage(paths.world_dir, world_payload,
                lambda directory: world_files.write_world(world_config, directory), log)
    payload = model_payload(world_config, pretrain_config)
    packaged = packaged_model(payload) if use_packaged else None
    rows: list[dict] = []

    def texts() -> list[dict]:
        if not rows:
            rows.extend(pretraining_texts(world_config, pretrain_config))
        return rows

    def make_tokenizer(directory: pathlib.Path) -> None:
        if packaged:
            _copy_packaged(lambda name: name.startswith("tokenizer"), directory)
        else:
            _make_tokenizer(texts(), pretrain_config, directory)

    def make_model(directory: pathlib.Path) -> None:
        if packaged:
            log(f"copying the committed base model ({packaged})")
            _copy_packaged(lambda name: True, directory)
        else:
            _make_model(texts(), paths.tokenizer_dir, pretrain_config, log, directory)

    build_stage(paths.tokenizer_dir, {**payload, "stage": "tokenizer"}, make_tokenizer, log)
    build_stage(paths.model_dir, payload, make_model, log)
    build_stage(paths.index_dir, {**world_payload, "index": "bm25"},
                lambda directory: _make_index(paths, directory), log)
    build_stage(paths.reading_dir,
                {**world_payload, "model": payload, "probe": _READING_PROBE_VERSION},
                lambda directory: _probe_reading(paths, world_config, directory), log)
    measured = json.loads((paths.reading_dir / READING_FILE).read_text())
    log(f"base model: reading F1 {measured['reading_f1']:.3f} with the gold passages in its "
        f"context, closed-book F1 {measured['closed_book_f1']:.3f}, on "
        f"{measured['questions']} unseen evaluation questions (synthetic/reading.py)")
    return paths


def _probe_reading(paths: WorldPaths, world_config: world_lib.WorldConfig,
                   directory: pathlib.Path) -> None:
    """Reading F1 (oracle documents) and closed-book F1 of the model on this world."""
    model = hf_io.load_pretrained(paths.model_dir)
    tokenizer = hf_io.load_tokenizer(paths.model_dir)
    eos_ids = hf_io.eos_token_ids(paths.model_dir, tokenizer)
    questions = reading.world_questions(world_config)[1][:_READING_QUESTIONS]
    documents = reading.OracleDocuments(world_files.read_jsonl(paths.corpus))
    read, _ = reading.reading_f1(model, tokenizer, questions, documents, eos_ids,
                                 top_k=world_config.demo_top_k)
    closed, _ = reading.closed_book_f1(model, tokenizer, questions, eos_ids)
    (directory / READING_FILE).write_text(json.dumps(dict(
        reading_f1=read, closed_book_f1=closed, questions=len(questions)), indent=1))


def _make_index(paths: WorldPaths, directory: pathlib.Path) -> None:
    """The corpus store and a BM25 index: the world's made-up names are whole keywords,
    which a lexical index matches exactly (a dense encoder splits them into word pieces)."""
    num = corpus_store.write_store(corpus_formats.read_corpus(paths.corpus), directory / "corpus",
                                   progress=False)
    bm25.BM25Index.build(corpus_store.CorpusStore(directory / "corpus"),
                         progress=False).save(directory / "bm25")
    (directory / "index.json").write_text(json.dumps(
        {"corpus": [str(paths.corpus)], "passages": num, "backends": ["bm25"], "encoder": None},
        indent=1))
