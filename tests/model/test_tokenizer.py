"""The real Qwen2.5 tokenizer loads from a local directory and renders its chat template."""
from searcher_jax.model import hf_io


def test_qwen_tokenizer_and_chat_template(reference_dir):
    tokenizer = hf_io.load_tokenizer(reference_dir / "tokenizers" / "qwen2.5")
    assert tokenizer.encode("<|begin_of_documents|>\n") == [27, 91, 7265, 3575, 75927, 91, 397]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Who wrote Hamlet?"}],
        tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n")
