"""The resumable order in which training visits its questions.

Question files, and `DIR:SPLIT` paths naming a split of a question_records dataset (array_record
files written by launch/build_questions.py, see data/question_records.py), are read by
data/question_reader.py; its names are re-exported here for the callers that read and order
questions together.
"""
from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from searcher_jax.data.question_reader import Question, read_questions, split_spec

__all__ = ["Question", "QuestionOrder", "expand_samples", "read_questions", "split_spec"]


def _grain_seed(seed: int) -> int:
    # grain seeds epoch e of `shuffle(seed=s)` with s + e, so seed s's 2nd epoch would be
    # seed s+1's 1st. Hashing the run seed keeps neighbouring run seeds unrelated.
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])


class QuestionOrder:
    """The endless, deterministic stream of training questions.

    Epoch e is positions [e*N, (e+1)*N): a fresh permutation of all N questions (or the
    file order with shuffle=False). A question is a pure function of (seed, position), so
    a run checkpoints the integer `position` and resumes exactly, with no iterator state.
    """

    def __init__(self, questions: Sequence[Question], seed: int, shuffle: bool = True):
        if not questions:
            raise ValueError("QuestionOrder needs at least one question")
        self.questions = tuple(questions)
        self.seed = seed
        self.shuffle = shuffle
        dataset = grain.MapDataset.source(self.questions)
        if shuffle:
            # shuffle before repeat: grain reshuffles each epoch and keeps epochs apart.
            dataset = dataset.shuffle(seed=_grain_seed(seed))
        self._stream = dataset.repeat()  # random access by global position, endless

    def __len__(self) -> int:
        return len(self.questions)  # questions per epoch

    def epoch_of(self, position: int) -> int:
        return position // len(self.questions)

    def batch(self, position: int, size: int) -> list[Question]:
        """The questions at positions [position, position + size) of the stream."""
        if position < 0 or size < 0:
            raise ValueError(f"position and size must be >= 0, got {position}, {size}")
        return [self._stream[i] for i in range(position, position + size)]


def expand_samples(questions: Sequence, samples_per_prompt: int) -> list:
    """Each item (a question, or its prompt's token ids) samples_per_prompt times in a row:
    the RL batch keeps a prompt's samples contiguous, so group statistics are taken over
    consecutive rows."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    return [q for q in questions for _ in range(samples_per_prompt)]
