"""The built tokenizer and tiny base model: loadable like Qwen, writing the search format."""
import dataclasses
import json

import pytest

from searcher_jax.data import prompts
from searcher_jax.model import hf_io
from searcher_jax.synthetic import build
from searcher_jax.synthetic import demonstrations
from searcher_jax.synthetic import probe
from searcher_jax.synthetic import world_files

TAGS = ("<|begin_of_query|>", "<|end_of_query|>", "<|begin_of_documents|>",
        "<|end_of_documents|>", "<think>", "</think>", "<answer>", "</answer>")
NUM_SAMPLES = 32
# Measured on the "ci" preset (2-core CPU, seeds 0-7 of the sampler): 25 to 32 of 32
# samples write a well-formed query, 28.5 on average.
MIN_WELL_FORMED = 0.7


@pytest.fixture(scope="module")
def model_and_tokenizer(world_paths):
    return (hf_io.load_pretrained(world_paths.model_dir),
            hf_io.load_tokenizer(world_paths.model_dir))


def test_model_directory_is_a_qwen2_checkpoint(world_paths, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = json.loads((world_paths.model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert (world_paths.model_dir / "model.safetensors").is_file()
    assert len(tokenizer) <= model.config.vocab_size
    assert config["eos_token_id"] == tokenizer.eos_token_id == tokenizer.pad_token_id
    log = json.loads((world_paths.model_dir / build.PRETRAIN_LOG_FILE).read_text())
    assert 200_000 < log["num_params"] == model.config.num_params < 5_000_000
    assert log["loss_last_10_mean"] < 0.2 * log["loss_first"]


def test_tags_are_plain_text(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    vocab = tokenizer.get_vocab()
    for tag in TAGS[:4]:
        assert tag not in vocab and len(tokenizer(tag)["input_ids"]) > 1
    assert tokenizer.all_special_tokens == ["<|endoftext|>"]


def test_every_name_and_year_the_world_writes_is_one_token(model_and_tokenizer):
    # One-token values are what the base model copies out of a passage (synthetic/names.py);
    # a name or year in pieces would be a value it reads worse.
    _, tokenizer = model_and_tokenizer
    config, _ = build.PRESETS["demo"]
    world = world_files.generate_world(config)
    years = {entity.founded_year for entity in world.train.places + world.eval.places}
    years |= {person.birth_year for person in world.train.people + world.eval.people}
    values = [*world.train.names(), *world.eval.names(), *world.countries, *map(str, years)]
    assert len(values) > 700
    pieces = {value: len(tokenizer(" " + value)["input_ids"]) for value in values}
    assert set(pieces.values()) == {1}, [value for value, n in pieces.items() if n != 1][:5]
    # Text around a name splits as before: the name stays one token inside a sentence.
    name = world.eval.people[0].name
    ids = tokenizer(f"Where was {name} born?")["input_ids"]
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + name))[0] in ids


def test_tokenizer_round_trips_the_pretraining_text(fresh_rows, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    texts = ([row["text"] for row in fresh_rows if row["kind"] == "demo"][:20]
             + [row["text"] for row in fresh_rows if row["kind"] != "demo"][:5])
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.eos_token_id not in ids   # no BOS/EOS added, as Qwen2's base tokenizer


def test_model_writes_well_formed_queries_for_unseen_entities(world_paths, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    questions = world_files.read_jsonl(world_paths.eval_questions)[:NUM_SAMPLES]
    prompt_texts = [prompts.base_prompt(row["question"]) for row in questions]
    rate, texts = probe.query_rate(model, tokenizer, prompt_texts, max_new_tokens=64, seed=0,
                                   eos_ids=hf_io.eos_token_ids(world_paths.model_dir, tokenizer))
    assert rate >= MIN_WELL_FORMED, texts


def test_unchanged_config_reuses_and_changed_config_rebuilds(world_model_dir, world_paths):
    world_config, pretrain_config = build.PRESETS["ci"]
    weights = world_paths.model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    messages = []
    build.build(world_model_dir, world_config, pretrain_config, log=messages.append)
    assert weights.stat().st_mtime_ns == before
    stages = [message for message in messages if not message.startswith("base model:")]
    assert len(stages) == 5 and all(message.startswith("reusing") for message in stages)
    assert any("reading F1" in message for message in messages)   # printed on every build
    changed = dataclasses.replace(pretrain_config, steps=pretrain_config.steps + 1)
    payload = json.loads((world_paths.model_dir / build.FINGERPRINT_FILE).read_text())
    assert payload["fingerprint"] == build.fingerprint(payload["payload"])
    assert build.fingerprint({**payload["payload"], "pretrain": dataclasses.asdict(changed)}) \
        != payload["fingerprint"]


def test_stage_reuses_on_a_matching_fingerprint_and_rebuilds_otherwise(tmp_path):
    made = []

    def make(directory):
        made.append(directory.name)
        (directory / "out.txt").write_text(str(len(made)))

    stage = tmp_path / "stage"
    for payload in ({"a": 1}, {"a": 1}, {"a": 2}):
        build.build_stage(stage, payload, make, log=lambda message: None)
    assert made == ["stage.partial", "stage.partial"]
    assert (stage / "out.txt").read_text() == "2" and not (tmp_path / "stage.partial").exists()


def test_build_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "notes.txt").write_text("mine")
    world_config, pretrain_config = build.PRESETS["ci"]
    with pytest.raises(FileExistsError, match="not written by this build"):
        build.build(tmp_path, world_config, pretrain_config, log=lambda message: None)
    assert (tmp_path / "world" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("preset", sorted(build.PRESETS))
def test_committed_base_model_is_what_the_presets_build(preset):
    """The committed weights (searcher_jax/synthetic/base_model) carry the fingerprint of the
    current model payload: changing the generator, the pretraining config or the behaviour
    shares without rebuilding them (`launch/pretrain_world.py --train --package`) fails here."""
    world_config, pretrain_config = build.PRESETS[preset]
    payload = build.model_payload(world_config, pretrain_config)
    record = json.loads((build.PACKAGED_MODEL_DIR / build.FINGERPRINT_FILE).read_text())
    assert record["payload"] == json.loads(json.dumps(payload))
    assert build.packaged_model(payload) == build.PACKAGED_MODEL_DIR
    for name in ("config.json", "model.safetensors", "tokenizer.json", "pretrain_log.json"):
        assert (build.PACKAGED_MODEL_DIR / name).is_file(), name
    other_seed = dataclasses.replace(world_config, seed=world_config.seed + 1)
    assert build.model_payload(other_seed, pretrain_config) == payload   # any world's model
