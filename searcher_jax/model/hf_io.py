"""HF checkpoints both ways: stream safetensors into sharded params, and export back.

Import reads each tensor by its byte range (local paths or anything etils.epath
opens, e.g. gs://) and places it straight into its target NamedSharding, so no
host ever holds more than one tensor beyond what its devices keep.
"""
from __future__ import annotations

import functools
import json
import logging
import pathlib
import struct
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx

from searcher_jax.model import sharding
from searcher_jax.model.config import ModelConfig
from searcher_jax.model.decoder import Decoder

_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32,
}
MAX_SHARD_BYTES = 4 << 30


def load_config(directory, **overrides) -> ModelConfig:
    path = epath.Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json in {directory}")
    return ModelConfig.from_hf(json.loads(path.read_text()), **overrides)


def load_tokenizer(directory):
    """The tokenizer saved in a local HF directory (never a hub download).

    A directory whose tokenizer_config.json names PreTrainedTokenizerFast (the synthetic
    world's) loads as that class: AutoTokenizer would pick the class of config.json's
    model_type (Qwen2Tokenizer), which in transformers 5 replaces tokenizer.json's
    pre-tokenizer with Qwen2's and so splits every year into digits the model never saw.
    """
    import transformers  # pylint: disable=import-outside-toplevel
    config = pathlib.Path(directory) / "tokenizer_config.json"
    if (config.is_file() and json.loads(config.read_text()).get("tokenizer_class")
            == "PreTrainedTokenizerFast"):
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(directory),
                                                                    local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _eos_field(value, source: str) -> list[int]:
    """An `eos_token_id` field (absent, an int, or a list of ints) as a list."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{source}: eos_token_id must be a token id or a list of them, "
                         f"got {value!r}")
    return values


def eos_token_ids(directory, tokenizer=None) -> tuple[int, ...]:
    """Every id that ends a sequence for the model in `directory`, in first-seen order.

    The union of config.json's `eos_token_id`, generation_config.json's (an int
    or a list: Qwen2.5-Instruct lists [151645, 151643], Llama-3.1-Instruct
    [128001, 128008, 128009]) and the tokenizer's, because a model stops at
    whichever of them it writes and HF `generate` reads the generation config.
    The rollout, evaluation, `ask` and the world's probe all take this set.

    Raises:
      ValueError: a malformed field, or no id at all.
    """
    directory = epath.Path(directory)
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = directory / name
        if path.exists():
            ids += _eos_field(json.loads(path.read_text()).get("eos_token_id"), str(path))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError(f"{directory}: no eos_token_id in config.json, generation_config.json "
                         "or the tokenizer; a rollout needs one to end rows")
    return tuple(dict.fromkeys(ids))


# --- Names and layouts ---------------------------------------------------------------------

def _layer_tensors(config: ModelConfig, layer: int):
    """Per layer: (HF name, our path inside a Block, HF tensor -> ours, ours -> HF)."""
    n, k, d, e = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
    prefix = f"model.layers.{layer}."

    def proj_in(heads):  # HF [heads*D, E] <-> ours [E, heads, D]
        return (lambda w: w.T.reshape(e, heads, d), lambda w: w.reshape(e, heads * d).T)

    def bias(heads):  # HF [heads*D] <-> ours [heads, D]
        return (lambda b: b.reshape(heads, d), lambda b: b.reshape(heads * d))

    def transpose():
        return (lambda w: w.T, lambda w: w.T)

    def same():
        return (lambda w: w, lambda w: w)

    specs = [
        ("input_layernorm.weight", ("input_norm",), same()),
        ("self_attn.q_proj.weight", ("attn", "q_proj"), proj_in(n)),
        ("self_attn.k_proj.weight", ("attn", "k_proj"), proj_in(k)),
        ("self_attn.v_proj.weight", ("attn", "v_proj"), proj_in(k)),
        ("self_attn.o_proj.weight", ("attn", "o_proj"),
         (lambda w: w.reshape(e, n, d).transpose(1, 2, 0),
          lambda w: w.transpose(2, 0, 1).reshape(e, n * d))),
        ("post_attention_layernorm.weight", ("post_attention_norm",), same()),
        ("mlp.gate_proj.weight", ("mlp", "gate_proj"), transpose()),
        ("mlp.up_proj.weight", ("mlp", "up_proj"), transpose()),
        ("mlp.down_proj.weight", ("mlp", "down_proj"), transpose()),
    ]
    if config.attention_bias:
        specs += [("self_attn.q_proj.bias", ("attn", "q_bias"), bias(n)),
                  ("self_attn.k_proj.bias", ("attn", "k_bias"), bias(k)),
                  ("self_attn.v_proj.bias", ("attn", "v_bias"), bias(k))]
    if config.qk_norm:
        specs += [("self_attn.q_norm.weight", ("attn", "q_norm"), same()),
                  ("self_attn.k_norm.weight", ("attn", "k_norm"), same())]
    for hf_name, path, (to_ours, to_hf) in specs:
        yield prefix + hf_name, path, to_ours, to_hf


def _global_tensors(config: ModelConfig):
    same = (lambda w: w, lambda w: w)
    yield "model.embed_tokens.weight", ("embed",), *same
    yield "model.norm.weight", ("final_norm",), *same
    if not config.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head",), lambda w: w.T, lambda w: w.T


def tensor_plan(config: ModelConfig) -> Iterator[tuple[str, tuple, int | None, Callable, Callable]]:
    """Every HF tensor: (name, our param path, layer index into a stacked param or None, to ours, to HF)."""
    for name, path, to_ours, to_hf in _global_tensors(config):
        yield name, path, None, to_ours, to_hf
    for layer in range(config.num_layers):
        for name, path, to_ours, to_hf in _layer_tensors(config, layer):
            if config.scan_layers:
                yield name, ("layers", *path), layer, to_ours, to_hf
            else:
                yield name, ("layers", layer, *path), None, to_ours, to_hf


# --- Reading safetensors by byte range ----------------------------------------------------

class SafetensorsFile:
    """Reads single tensors from a safetensors file without loading the rest."""

    def __init__(self, path: epath.Path):
        self.path = path
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name} in {self.path} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        array = np.empty(entry["shape"], _DTYPES[entry["dtype"]])
        with self.path.open("rb") as f:
            f.seek(self.data_start + start)
            if array.size and f.readinto(array.reshape(-1).view(np.uint8)) != end - start:
                raise ValueError(f"{self.path} is truncated inside tensor {name}")
        return array


def _open_checkpoint(directory: epath.Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file that holds it, from the index or the lone file."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = {f: SafetensorsFile(directory / f) for f in sorted(set(weight_map.values()))}
        return {name: files[f] for name, f in weight_map.items()}
    paths = sorted(directory.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    by_name = {}
    for path in paths:
        st = SafetensorsFile(path)
        by_name.update({name: st for name in st.entries})
    return by_name


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# --- Import ---------------------------------------------------------------------------------

def load_pretrained(directory, *, mesh: jax.sharding.Mesh | None = None,
                    rules=sharding.DEFAULT_RULES, **overrides) -> Decoder:
    """Builds a Decoder from a HF directory, placing each tensor in its shard.

    `overrides` set the run fields of ModelConfig (dtype, scan_layers, remat,
    attention, attention_block).
    """
    directory = epath.Path(directory)
    config = load_config(directory, **overrides)
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    tensors = _open_checkpoint(directory)

    expected = {name for name, *_ in tensor_plan(config)}
    unexpected = sorted(set(tensors) - expected)
    # Tied checkpoints sometimes also store a copy of the embedding as lm_head; it is not read.
    if config.tie_word_embeddings and unexpected == ["lm_head.weight"]:
        unexpected = []
    if unexpected:
        raise ValueError(f"unexpected tensor(s) in {directory} for a {config.model_type} model: "
                         f"{', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))

    values = {}
    for name, path, layer, to_ours, _ in tensor_plan(config):
        if name not in tensors:
            raise ValueError(f"missing tensor {name} in {directory}")
        target = _get(abstract_state, path)
        target_sharding = _get(shardings, path)
        want = target.shape if layer is None else target.shape[1:]
        array = to_ours(tensors[name].read(name))
        if tuple(array.shape) != tuple(want):
            hf_shape = tuple(tensors[name].entries[name]["shape"])
            raise ValueError(f"shape mismatch for tensor {name}: checkpoint has {hf_shape} "
                             f"(as ours {tuple(array.shape)}), model expects {tuple(want)}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if layer is None:
            values[path] = _place(array, target_sharding)
        else:
            if path not in values:
                values[path] = _zeros(target.shape, target_sharding)
            values[path] = jax.block_until_ready(_set_layer(
                values[path], _place(array, _drop_leading(target_sharding)), layer))
        del array

    flat = nnx.to_flat_state(abstract_state)
    for path, variable in flat:
        variable.set_value(values[path])
    state = nnx.from_flat_state(flat)
    logging.info("loaded %s (%d tensors) from %s", config.model_type, len(expected), directory)
    return nnx.merge(graphdef, state)


def _place(array: np.ndarray, target: jax.sharding.NamedSharding) -> jax.Array:
    """Each device takes only its slice of the host array.

    Waits for the copy, so transfers never pile up host buffers: at most one
    tensor is in flight, whatever the speed of the devices.
    """
    return jax.block_until_ready(
        jax.make_array_from_callback(array.shape, target, lambda index: array[index]))


def _drop_leading(target: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(target.mesh, jax.sharding.PartitionSpec(*target.spec[1:]))


def _zeros(shape, target):
    return jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=target)()


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_layer(stacked, layer_value, layer):
    return jax.lax.dynamic_update_index_in_dim(stacked, layer_value, layer, 0)


# --- Export ---------------------------------------------------------------------------------

def _to_host(value: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered across processes on a pod)."""
    return sharding.host_array(value).astype(np.float32, copy=False)

def save_pretrained(model: Decoder, directory, *, max_shard_bytes: int = MAX_SHARD_BYTES,
                    hf_config_extra: dict | None = None,
                    eos_ids: tuple[int, ...] | None = None) -> None:
    """Writes config.json and safetensors shards that transformers' from_pretrained loads.

    eos_ids, when given, go to generation_config.json, so an exported policy
    (for serving, evaluation or another run's model.hf_dir) keeps every end-of-sequence id of the model
    it was trained from, not only config.json's.
    """
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

    directory = epath.Path(directory)
    # On a pod every process gathers each tensor (a collective); only process 0 writes.
    writer = jax.process_index() == 0
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = nnx.state(model, nnx.Param)
    hf_config = config.to_hf()
    hf_config.update(hf_config_extra or {})

    shard, shard_bytes, shards = {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            shards.append(list(shard))
            name = f"model-{len(shards):05d}.safetensors.tmp"
            if writer:
                save_file(shard, str(directory / name), metadata={"format": "pt"})
            shard, shard_bytes = {}, 0

    total = 0
    for name, path, layer, _, to_hf in tensor_plan(config):
        value = _get(state, path)[...]
        if layer is not None:
            value = value[layer]
        array = np.ascontiguousarray(to_hf(_to_host(value)))
        if shard and shard_bytes + array.nbytes > max_shard_bytes:
            flush()
        shard[name] = array
        shard_bytes += array.nbytes
        total += array.nbytes
    flush()
    if not writer:
        return

    weight_map = {}
    for i, names in enumerate(shards, start=1):
        tmp = directory / f"model-{i:05d}.safetensors.tmp"
        final = ("model.safetensors" if len(shards) == 1
                 else f"model-{i:05d}-of-{len(shards):05d}.safetensors")
        tmp.replace(directory / final)  # overwrites an earlier export
        weight_map.update({name: final for name in names})
    if len(shards) > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    if eos_ids:
        (directory / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [int(i) for i in eos_ids]}, indent=2))
