"""searcher_jax: R1-Searcher (RL to search while reasoning) in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.6.0",
    "flax>=0.11.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "transformers>=4.51.0",
    "tokenizers>=0.21.0",
    "safetensors>=0.4.5",
    "tensorflow-datasets>=4.9.7",
    # tensorflow-datasets imports it when it builds a dataset (data/question_records.py) but
    # declares it only for Python < 3.9.
    "importlib_resources>=6.0",
    "grain>=0.2.10",
    "scann>=1.4.0",
    "bm25s>=0.2.10",
    "ml-collections>=1.0.0",
    "absl-py>=2.1.0",
    "numpy>=1.26",
    "tqdm>=4.66",
    # The demo's plots (searcher_jax/run_report.py: training curves, the policy comparison).
    "matplotlib>=3.8",
    # TensorBoard event files of a run's metrics, without TensorFlow.
    "tensorboardX>=2.6",
    "etils[epath]>=1.7.0",
    # The LLM judge's and the online search backend's HTTP client (pooled sessions, timeouts),
    # and urllib3's Retry for their bounded retries (llm_client.py, retrieval/web.py,
    # retrieval/http_client.py).
    "requests>=2.31",
    "urllib3>=2.0",
    # The retrieval server (retrieval/server.py): Starlette on uvicorn's h11 parser, a
    # production HTTP stack instead of http.server; pydantic for its request schemas.
    "starlette>=0.37",
    "uvicorn>=0.30",
    "pydantic>=2.5",
]

EXTRAS = {
    # The HF reference runs on PyTorch; 2.13.0 is a CPU build (a CUDA build is gigabytes).
    # jax[tpu] brings libtpu, which compiles TPU programs here for the memory-plan test.
    "test": ["pytest>=8.0", "hypothesis>=6.100", "torch==2.13.0", "jax[tpu]>=0.6.0"],
    # Peers for launch/benchmark.py. Tunix (the JAX sampler peer) is installed with
    # --no-deps, as the README says: its pins would downgrade transformers.
    "bench": ["faiss-cpu>=1.8.0", "torch==2.13.0"],
    # TPU pods, and compiling TPU programs (memory plans) on a machine with no TPU.
    "tpu": ["jax[tpu]>=0.6.0"],
}

setuptools.setup(
    name="searcher_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["searcher_jax", "searcher_jax.*"]),
    # The synthetic world's committed base model (synthetic/build.py, PACKAGED_MODEL_DIR).
    package_data={"searcher_jax.synthetic": ["base_model/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
