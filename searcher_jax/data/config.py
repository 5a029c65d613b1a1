"""Static configuration of the question data a run reads."""
from __future__ import annotations

import dataclasses

from searcher_jax.data.prompts import PROMPT_STYLES


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_file: str = ""  # questions (jsonl: question + answer, or DIR:SPLIT; data/questions.py)
    eval_file: str = ""  # "" for no evaluation during training
    prompt_style: str = "base"  # "base" (no chat template) | "instruct" (chat template)
    max_prompt_len: int = 1024  # longer prompts are dropped with a warning
    shuffle: bool = True

    def __post_init__(self):
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"config.data.prompt_style must be one of {PROMPT_STYLES}, "
                             f"got {self.prompt_style!r}")
        if self.max_prompt_len < 1:
            raise ValueError(f"config.data.max_prompt_len must be >= 1, got {self.max_prompt_len}")
