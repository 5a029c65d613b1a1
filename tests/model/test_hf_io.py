"""Export to HF and back, streaming import memory, and the error messages."""
import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from searcher_jax.model import hf_io
from searcher_jax.model.config import ModelConfig
from tests.model.conftest import max_valid_diff, torch_logits


@pytest.mark.parametrize("kind,scan_layers", [("qwen2", True), ("llama", False), ("qwen3", True)])
def test_export_loads_in_transformers_with_same_logits(hf_models, padded_batch, tmp_path,
                                                       kind, scan_layers):
    import transformers
    directory, _ = hf_models[kind]
    tokens, lengths = padded_batch
    model = hf_io.load_pretrained(directory, scan_layers=scan_layers)
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(lengths)))
    hf_io.save_pretrained(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert max_valid_diff(torch_logits(reloaded, tokens, lengths), ours, lengths) < 1e-4


def test_export_in_shards_with_index_round_trips(hf_models, padded_batch, tmp_path):
    directory, _ = hf_models["llama"]
    tokens, _ = padded_batch
    model = hf_io.load_pretrained(directory)
    hf_io.save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    again = hf_io.load_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(again.layers[1].mlp.up_proj[...]),
                                  np.asarray(model.layers[1].mlp.up_proj[...]))
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(tokens))),
                                  np.asarray(model(jnp.asarray(tokens))))


def _copy_checkpoint(src, dst) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(hf_models, tmp_path):
    directory = _copy_checkpoint(hf_models["qwen2"][0], tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_io.load_pretrained(directory)


def test_unexpected_tensor_is_named(hf_models, tmp_path):
    directory = _copy_checkpoint(hf_models["llama"][0], tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_extra"] = np.zeros(3, np.float32)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.0\.self_attn\.rotary_extra"):
        hf_io.load_pretrained(directory)


def test_shape_mismatch_names_tensor_and_both_shapes(hf_models, tmp_path):
    directory = _copy_checkpoint(hf_models["qwen2"][0], tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 80
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch for tensor model\.layers\.0\.mlp\.gate_proj"
                       r"\.weight: checkpoint has \(96, 64\).*expects \(64, 80\)"):
        hf_io.load_pretrained(directory)


def test_unsupported_model_type_and_rope_type(hf_models, tmp_path):
    directory = _copy_checkpoint(hf_models["llama"][0], tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'mistral'"):
        hf_io.load_pretrained(directory)
    rope = {**config["rope_parameters"], "rope_type": "yarn"}
    (directory / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    with pytest.raises(ValueError, match=r"unsupported rope_scaling type 'yarn'"):
        hf_io.load_pretrained(directory)


def test_missing_checkpoint_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_io.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig(
        "qwen2", 16, 8, 8, 1, 2, 1, 4).to_hf()))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        hf_io.load_pretrained(tmp_path)


_MEMORY_PROBE = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from searcher_jax.model import hf_io
    jax.block_until_ready(jnp.ones(8) + 1)  # Backend up before the baseline.
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field)) * 1024
    base = status("VmRSS")
    model = hf_io.load_pretrained(sys.argv[1])
    jax.block_until_ready(model.embed[...])
    print(base, status("VmHWM"))
""")


def test_streaming_import_peak_memory(tmp_path):
    """Peak host memory stays under the model plus twice its largest tensor."""
    config = ModelConfig("qwen2", vocab_size=16384, hidden_size=1024, intermediate_size=4096,
                         num_layers=4, num_heads=8, num_kv_heads=2, head_dim=128,
                         tie_word_embeddings=False, attention_bias=True)
    rng = np.random.default_rng(0)
    total = largest = 0
    by_file = {}  # One safetensors file per layer, as large checkpoints are sharded.
    for name, shape in _hf_shapes(config).items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "top"
        by_file.setdefault(part, {})[name] = shape
    weight_map = {}
    for part, entries in by_file.items():
        tensors = {n: rng.standard_normal(s, dtype=np.float32) * 0.02 for n, s in entries.items()}
        for array in tensors.values():
            total += array.nbytes
            largest = max(largest, array.nbytes)
        save_file(tensors, tmp_path / f"{part}.safetensors")
        weight_map.update({n: f"{part}.safetensors" for n in entries})
        del tensors
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    assert total > 200e6
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path)],
                            capture_output=True, text=True, check=True)
    base, peak = map(int, result.stdout.split()[-2:])
    growth = peak - base
    print(f"model {total / 1e6:.0f} MB, largest {largest / 1e6:.0f} MB, import grew {growth / 1e6:.0f} MB")
    assert growth < total + 2 * largest


def _hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,),
              "lm_head.weight": (v, e)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (e,), p + "post_attention_layernorm.weight": (e,),
            p + "self_attn.q_proj.weight": (q, e), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, e), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, e), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (e, q), p + "mlp.gate_proj.weight": (f, e),
            p + "mlp.up_proj.weight": (f, e), p + "mlp.down_proj.weight": (e, f)})
    return shapes


class _Tokenizer:
    def __init__(self, eos_token_id):
        self.eos_token_id = eos_token_id


@pytest.mark.parametrize("config_eos, generation_eos, tokenizer_eos, expected", [
    # Qwen2.5-7B-Instruct: config.json 151645, generation_config.json both.
    (151645, [151645, 151643], 151645, (151645, 151643)),
    # Llama-3.1-8B-Instruct: config.json lists three, the tokenizer names 128009.
    ([128001, 128008, 128009], [128001, 128008, 128009], 128009, (128001, 128008, 128009)),
    (7, None, None, (7,)),  # no generation config
    (None, 3, 5, (3, 5)),
])
def test_eos_ids_are_the_union_of_config_generation_config_and_tokenizer(
        tmp_path, config_eos, generation_eos, tokenizer_eos, expected):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": config_eos}))
    if generation_eos is not None:
        (tmp_path / "generation_config.json").write_text(
            json.dumps({"eos_token_id": generation_eos}))
    assert hf_io.eos_token_ids(tmp_path, _Tokenizer(tokenizer_eos)) == expected


def test_no_or_malformed_eos_ids_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="no eos_token_id"):
        hf_io.eos_token_ids(tmp_path, _Tokenizer(None))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be"):
        hf_io.eos_token_ids(tmp_path)


def test_eos_ids_of_the_released_instruct_models(reference_dir, tmp_path):
    """Real files: Qwen2.5-Instruct ends at <|im_end|> or <|endoftext|>, Llama-3.1-Instruct at
    any of the three ids its config.json lists."""
    qwen = tmp_path / "qwen"
    shutil.copytree(reference_dir / "tokenizers" / "qwen2.5", qwen)
    shutil.copy(reference_dir / "hf_configs" / "Qwen2.5-0.5B-Instruct" / "config.json", qwen)
    assert hf_io.eos_token_ids(qwen, hf_io.load_tokenizer(qwen)) == (151645, 151643)
    llama = reference_dir / "hf_configs" / "Llama-3.1-8B-Instruct"
    assert hf_io.eos_token_ids(llama) == (128001, 128008, 128009)


def test_an_export_keeps_every_eos_id(hf_models, tmp_path):
    """The exported policy ends rows where its base model did, and transformers reads the
    same set from the generation config it writes."""
    import transformers
    directory, _ = hf_models["qwen2"]
    hf_io.save_pretrained(hf_io.load_pretrained(directory), tmp_path, eos_ids=(5, 3, 9))
    config_eos = json.loads((tmp_path / "config.json").read_text()).get("eos_token_id")
    config_eos = [] if config_eos is None else np.atleast_1d(config_eos).tolist()
    assert hf_io.eos_token_ids(tmp_path) == tuple(dict.fromkeys([*config_eos, 5, 3, 9]))
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert list(generation.eos_token_id) == [5, 3, 9]
