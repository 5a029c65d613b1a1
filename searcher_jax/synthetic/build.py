"""Builds the synthetic world, its tokenizer and its tiny base model into one directory.

    <root>/world/      corpus.jsonl, train.jsonl, eval.jsonl, pretrain.jsonl
    <root>/tokenizer/  a HF tokenizer directory
    <root>/model/      a HF checkpoint directory (config.json with model_type qwen2,
                       model.safetensors, the tokenizer files, pretrain_log.json)

Each stage writes a fingerprint of the configs it depends on; a stage whose
fingerprint matches is reused, so rebuilding with an unchanged config costs
nothing, and a changed config rebuilds only the stages it affects.
"""
import dataclasses
import hashlib
import json
import pathlib
import random
import shutil
import time
from typing import Callable

import numpy as np
from flax import nnx

from searcher_jax.model import hf_io
from searcher_jax.model.decoder import Decoder
from searcher_jax.retrieval import bm25, corpus_formats, corpus_store
from searcher_jax.synthetic import names
from searcher_jax.synthetic import pretrain as pretrain_lib
from searcher_jax.synthetic import templates
from searcher_jax.synthetic import tokenizer as tokenizer_lib
from searcher_jax.synthetic import world as world_lib
from searcher_jax.synthetic import world_files

# Bump when the generator's output changes for the same config, so old builds are redone.
FORMAT_VERSION = 4
FINGERPRINT_FILE = "fingerprint.json"
PRETRAIN_LOG_FILE = "pretrain_log.json"

PRESETS = {
    # Small enough to build in a few minutes on 2 CPU cores (the tests' shared fixture).
    "ci": (world_lib.WorldConfig(num_places=24, num_people=96, num_organisations=24,
                                 num_works=48, num_train_questions=200, num_eval_questions=64,
                                 num_demo_questions=400, num_demos=800),
           pretrain_lib.PretrainConfig(vocab_size=2048, hidden_size=128, intermediate_size=384,
                                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                                       seq_len=384, batch_size=8, steps=300,
                                       learning_rate=6e-3, warmup_steps=10)),
    # The laptop demo's base model: the configs' defaults.
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
    def pretrain_texts(self) -> pathlib.Path:
        return self.world_dir / world_files.PRETRAIN_FILE

    @property
    def tokenizer_dir(self) -> pathlib.Path:
        return self.root / "tokenizer"

    @property
    def model_dir(self) -> pathlib.Path:
        return self.root / "model"

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


def _texts(paths: WorldPaths, kind: str) -> list[str]:
    return [row["text"] for row in world_files.read_jsonl(paths.pretrain_texts)
            if row["kind"] == kind]


def _make_model(paths: WorldPaths, config: pretrain_lib.PretrainConfig,
                log: Callable[[str], None], directory: pathlib.Path) -> None:
    tokenizer = hf_io.load_tokenizer(paths.tokenizer_dir)
    eos = tokenizer.eos_token_id
    demo_ids = tokenizer(_texts(paths, world_files.DEMO))["input_ids"]
    passage_ids = tokenizer(_texts(paths, world_files.PASSAGE))["input_ids"]
    demos, num_cut = pretrain_lib.demo_rows(demo_ids, eos, config.seq_len)
    stream = pretrain_lib.passage_stream(passage_ids, eos)
    model = Decoder(config.model_config(len(tokenizer), eos), rngs=nnx.Rngs(config.seed))
    start = time.time()
    losses = pretrain_lib.pretrain(model, demos, stream, config, log)
    seconds = time.time() - start
    hf_io.save_pretrained(model, directory)
    for path in paths.tokenizer_dir.iterdir():
        if path.name != FINGERPRINT_FILE:
            shutil.copy(path, directory / path.name)
    (directory / PRETRAIN_LOG_FILE).write_text(json.dumps(dict(
        num_params=model.config.num_params, train_seconds=round(seconds, 1),
        num_demos=len(demo_ids), demos_cut_at_seq_len=num_cut,
        demo_tokens_mean=float(np.mean([len(ids) for ids in demo_ids])),
        passage_tokens=int(stream.shape[0]),
        loss_first=losses[0], loss_last_10_mean=float(np.mean(losses[-10:])),
        losses_every_10=losses[::10]), indent=2))


def build(root: pathlib.Path, world_config: world_lib.WorldConfig,
          pretrain_config: pretrain_lib.PretrainConfig,
          log: Callable[[str], None] = print) -> WorldPaths:
    """Builds (or reuses) world, tokenizer and model under `root`."""
    paths = WorldPaths(pathlib.Path(root))
    world_payload = {"version": FORMAT_VERSION, "world": dataclasses.asdict(world_config)}
    build_stage(paths.world_dir, world_payload,
                lambda directory: world_files.write_world(world_config, directory), log)

    def make_tokenizer(directory: pathlib.Path) -> None:
        texts = [row["text"] for row in world_files.read_jsonl(paths.pretrain_texts)]
        world = world_files.generate_world(world_config)
        name_words = {word for name in world.train.names() + world.countries
                      for word in name.split()} - set(templates.ORGANISATION_KINDS)
        texts = names.redraw_words(texts, name_words, random.Random(world_config.seed + 4))
        tokenizer_lib.save_tokenizer(
            tokenizer_lib.train_tokenizer(texts, pretrain_config.vocab_size), directory)

    build_stage(paths.tokenizer_dir,
                {**world_payload, "vocab_size": pretrain_config.vocab_size}, make_tokenizer, log)
    build_stage(paths.model_dir,
                {**world_payload, "pretrain": dataclasses.asdict(pretrain_config)},
                lambda directory: _make_model(paths, pretrain_config, log, directory), log)
    build_stage(paths.index_dir, {**world_payload, "index": "bm25"},
                lambda directory: _make_index(paths, directory), log)
    return paths


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
