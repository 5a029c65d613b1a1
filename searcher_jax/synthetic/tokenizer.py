"""A small byte-level BPE tokenizer trained on the world's pretraining text.

Shaped like Qwen2's: byte-level BPE behind Qwen2's pre-tokenizer split (so a
punctuation run takes the newlines after it, and `|>` + `\\n\\n` can be one
token, as with Qwen2.5 where `<|end_of_query|>` need not end on a token
boundary), no BOS, and `<|endoftext|>` as both EOS and padding. The search tags
are plain text, never added tokens (SPEC section 1). Saved as a HF tokenizer
directory that `transformers.AutoTokenizer` loads.
"""
import json
import pathlib

import tokenizers
import transformers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

EOS = "<|endoftext|>"
# Qwen2's pre-tokenizer pattern (its tokenizer.json), so words, digits, punctuation runs and
# newlines split where they split for Qwen2.5.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(texts: list[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Trains BPE on `texts`; the result has exactly `vocab_size` ids at most."""
    if vocab_size < 300:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is below the 256 byte "
                         "tokens plus room for merges")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS,
                                                pad_token=EOS, clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer: transformers.PreTrainedTokenizerFast,
                   directory: pathlib.Path) -> None:
    """Saves a HF tokenizer directory that transformers 4 and 5 both load."""
    tokenizer.save_pretrained(str(directory))
    # transformers 5 writes its own class name (TokenizersBackend), which 4.x cannot load;
    # PreTrainedTokenizerFast loads tokenizer.json in both.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
