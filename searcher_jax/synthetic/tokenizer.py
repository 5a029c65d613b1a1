"""A small byte-level BPE tokenizer trained on the base model's pretraining text.

Shaped like Qwen2's: byte-level BPE behind Qwen2's pre-tokenizer split (so a
punctuation run takes the newlines after it, and `|>` + `\\n\\n` can be one
token, as with Qwen2.5 where `<|end_of_query|>` need not end on a token
boundary), no BOS, and `<|endoftext|>` as both EOS and padding. The search tags
are plain text, never added tokens (SPEC section 1). Saved as a HF tokenizer
directory that `transformers.AutoTokenizer` loads.

One difference from Qwen2: a number is one pre-token with the space before it
(GPT-2's rule), not one per digit, and `whole_words` (the world's names and
years) become single tokens, so every value the base model reads is one token
to copy (synthetic/names.py says why).
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
# Qwen2's pre-tokenizer pattern (its tokenizer.json), so words, punctuation runs and newlines
# split where they split for Qwen2.5; numbers as GPT-2 splits them (" 1843" is one piece).
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+| ?\p{N}+"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# Times each whole word is added to the BPE training text, so its last merge is frequent
# enough to be learned within the vocabulary.
_WHOLE_WORD_REPEATS = 20


def train_tokenizer(texts: list[str], vocab_size: int,
                    whole_words: tuple[str, ...] = ()) -> transformers.PreTrainedTokenizerFast:
    """Trains BPE on `texts`; the result has `vocab_size` ids at most.

    Each of `whole_words` is one token after a space (" Feda", " 1843").
    Raises ValueError if `vocab_size` leaves no room for them.
    """
    if vocab_size < 300:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is below the 256 byte "
                         "tokens plus room for merges")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    words = " " + " ".join(whole_words)
    tokenizer.train_from_iterator(list(texts) + [words] * _WHOLE_WORD_REPEATS, trainer=trainer)
    split = [word for word in whole_words if len(tokenizer.encode(" " + word).ids) != 1]
    if split:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} leaves {len(split)} of "
                         f"{len(whole_words)} whole words in pieces (e.g. {split[:3]}); raise it")
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
