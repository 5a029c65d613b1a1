"""Question files as a TFDS dataset of array_record files, written and read without TensorFlow.

    python launch/build_questions.py --out gs://bucket/questions \\
        train=.../stage_2.jsonl hotpotqa=.../hotpotqa_500.jsonl

writes one array_record split per file, and its dataset_info.json, under
`OUT/question_records/1.0.0`. Each record holds one question's id, text and gold answers,
parsed and checked by `read_questions` when the dataset is built, so a malformed row stops
the build with its file and line instead of a run hours later. A run names a split with
`DIR:SPLIT` wherever it takes a question file (data/questions.py parses it):
`--config.data.train_file=gs://bucket/questions/question_records/1.0.0:train`.
read_questions (data/question_reader.py) reads a split back: this module imports the reader to
build a dataset, so the reader does not import this module. It reads with random access
(tfds.data_source), never all decoded up front by TFDS; TFDS stores records in an order of its
own (a hash of each question's position in its file).
"""
from __future__ import annotations

from collections.abc import Mapping

import tensorflow_datasets as tfds
from etils import epath

from searcher_jax.data.question_reader import read_questions


class QuestionRecords(tfds.core.GeneratorBasedBuilder):
    """Splits named by the user, each one question file in any format read_questions reads."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "id, question, answers."}

    def __init__(self, *, split_files: Mapping[str, str] | None = None, **kwargs):
        self._split_files = dict(split_files or {})
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answers": tfds.features.Sequence(tfds.features.Text()),
        }))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(path) for split, path in self._split_files.items()}

    def _generate_examples(self, path):
        for position, q in enumerate(read_questions(path)):
            yield position, {"id": q.id, "question": q.question, "answers": list(q.answers)}


def write_records(split_files: Mapping[str, str], data_dir) -> epath.Path:
    """Builds the dataset under data_dir; returns its directory (DIR of `DIR:SPLIT`)."""
    if not split_files:
        raise ValueError("give at least one SPLIT=FILE")
    for split in split_files:
        if not split.replace("_", "").isalnum():
            raise ValueError(f"split name {split!r}: use letters, digits and _ only")
    builder = QuestionRecords(split_files=split_files, data_dir=str(data_dir), file_format="array_record")
    if builder.data_path.exists():
        raise FileExistsError(f"{builder.data_path} exists: give another --out or remove it")
    builder.download_and_prepare()
    return epath.Path(builder.data_path)


def split_sizes(directory) -> dict[str, int]:
    return {name: split.num_examples for name, split in tfds.builder_from_directory(str(directory)).info.splits.items()}
