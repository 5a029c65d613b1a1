"""Shared test set-up: 8 host CPU devices for sharding tests, reference data."""
import atexit
import os
import pathlib
import shutil
import tempfile

# Must be set before jax is imported anywhere in the test session. XLA:CPU ends the process
# when a device's thread waits over 40 s in a collective (its default terminate timeout).
# Suite runs here died three times with a bare "Fatal Python error: Aborted" inside a step
# sharded over the 8 simulated devices (pytest's capture swallowed XLA's message, and three
# concurrent reruns did not reproduce it), which that timeout on 2 busy cores would cause;
# raised so that slowness cannot end a run, while a real deadlock still does.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
                      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session and the runs it starts as subprocesses: many tests
# run the demo config's tiny model, and each run compiled the same sampler and train-step
# programs again (XLA:CPU, seconds each). A fresh directory per session, removed at its end:
# no executable outlives the code that compiled it. Programs under half a second to
# compile are not worth a file.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="searcher_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from searcher_jax.synthetic import build as world_build
from tests.hf_reference import make_hf_model

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE_DIR = pathlib.Path(
    os.environ.get("SEARCHER_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference data not found at {REFERENCE_DIR}; set SEARCHER_REFERENCE "
                    "to the shared/reference directory")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def world_model_dir(tmp_path_factory) -> pathlib.Path:
    """The synthetic world and its tiny base model (the "ci" preset), built once per session.

    Layout: see searcher_jax/synthetic/build.py (world/, tokenizer/, model/). Built
    from scratch in a temporary directory, or, when SEARCHER_WORLD_DIR is set, in
    that directory, reusing what an earlier run built there with the same config.
    """
    root = os.environ.get("SEARCHER_WORLD_DIR")
    root = pathlib.Path(root) if root else tmp_path_factory.mktemp("synthetic_world")
    world_config, pretrain_config = world_build.PRESETS["ci"]
    world_build.build(root, world_config, pretrain_config, log=lambda message: None)
    return root


@pytest.fixture(scope="session")
def fresh_rows() -> list[dict]:
    """Pretraining text of the "ci" preset's kind (synthetic/fresh.py): 400 demonstrations
    and 20 reading drills, drawn once per session."""
    from searcher_jax.synthetic import fresh, world_files
    world_config, _ = world_build.PRESETS["ci"]
    return list(fresh.fresh_texts(world_config, world_files.reserved_text(), num_demos=400,
                                  num_drills=20, lookups=3, texts_per_part=8, seed=0))


@pytest.fixture(scope="session")
def world_paths(world_model_dir) -> world_build.WorldPaths:
    return world_build.WorldPaths(world_model_dir)


@pytest.fixture(scope="session")
def world_policy(world_paths) -> dict:
    """The world's base model as the rollout samples it: its sampling copy ("copy"), tokenizer,
    stop table of the rollout's tags ("table") and end-of-sequence ids ("eos_ids")."""
    from searcher_jax import rollout
    from searcher_jax.model import hf_io
    from searcher_jax.sampling import sampler, stop_strings
    model = hf_io.load_pretrained(world_paths.model_dir)
    tokenizer = hf_io.load_tokenizer(world_paths.model_dir)
    table = stop_strings.stop_table_for_tokenizer(tokenizer, list(rollout.STOP_STRINGS),
                                                  vocab_size=model.config.vocab_size)
    return dict(copy=sampler.sampling_copy(model), tokenizer=tokenizer, table=table,
                eos_ids=hf_io.eos_token_ids(world_paths.model_dir, tokenizer))


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (directory, torch model), written once per session: qwen2 (tied), qwen3,
    llama (untied, llama3 RoPE), and llama_margin (lm_head scaled x40, so greedy argmaxes
    are far from ties)."""
    out = {}
    for name, kind, scale in (("qwen2", "qwen2", 1.0), ("qwen3", "qwen3", 1.0),
                              ("llama", "llama", 1.0), ("llama_margin", "llama", 40.0)):
        directory = tmp_path_factory.mktemp(f"hf_{name}")
        model = make_hf_model(kind, head_scale=scale)
        model.save_pretrained(directory)
        out[name] = (directory, model)
    return out
