"""tfds dataset builders for LongHealth, QuALITY and QASPER that run WITHOUT TensorFlow.

They read the source files from a local `manual_dir` (we never download) and write ArrayRecord
files; read them back with `builder.as_data_source(split)` (numpy/bytes records, random access).
TensorFlow is never imported: with tensorflow-datasets 4.9.10, `file_format="array_record"`
builds and `as_data_source()` reads with numpy only. What needs TensorFlow (checked): nested
ragged features, i.e. a `Sequence` inside a `Sequence` ("Error while serializing feature ...:
No module named 'tensorflow'"), and `as_dataset()` (tf.data). So the features use at most one
level of `Sequence` of dicts; deeper lists (LongHealth answer locations, QASPER answers) are
JSON strings, and QuALITY options are a fixed-length (4,) string tensor. The example structures
are those of the plain readers in `cas.data.benchmarks` (documented there).

Usage:
  builder = LongHealth(data_dir="/tmp/tfds")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir="/data/longhealth"))
  records = builder.as_data_source(split="test")     # len(), records[i]
  collection = longhealth_to_collection(records)
or in one call: `load_tfds_collection("longhealth", manual_dir, data_dir)`.

Registered tfds names: cas_longhealth, cas_quality, cas_qasper (tfds itself ships a `quality`).
"""
from __future__ import annotations

import inspect
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cas.data import benchmarks
from cas.data.types import Collection, CollectionError

_Text = tfds.features.Text
_FILE_FORMAT = "array_record"


def _manual_files(dataset: str, dl_manager) -> dict[str, str]:
  files = benchmarks.find_split_files(dataset, os.fspath(dl_manager.manual_dir))
  if not files:
    raise CollectionError(f"{dl_manager.manual_dir}: no {dataset} source files; expected names "
                          f"matching {benchmarks.expected_files(dataset)}")
  return files


class _ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common set-up: manual_dir only, array_record by default, file order kept (no shuffling)."""

  DATASET = ""

  def __init__(self, *, file_format: str = _FILE_FORMAT, **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  # tfds 4.9.10's default `code_path` touches `importlib_resources.abc` for any builder defined
  # in a package, but only declares that dependency for Python < 3.9, so on 3.11 preparing a
  # builder fails with "No module named 'importlib_resources'" (tensorflow/datasets#11212).
  # The path of the module defining the builder is all tfds needs (it looks for checksums.tsv
  # next to it, and we have none).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))

  def _split_generators(self, dl_manager):
    files = _manual_files(self.DATASET, dl_manager)
    return {split: self._generate_examples(path) for split, path in sorted(files.items())}

  def _generate_examples(self, path):
    for ex in benchmarks.READERS[self.DATASET](path):
      yield self._key(ex), ex


class LongHealth(_ManualBuilder):
  """LongHealth (Adams et al. 2024): 20 fictional patients, 5-option MC questions."""
  name = "cas_longhealth"
  DATASET = "longhealth"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (manual_dir, array_record)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put benchmark_v5.json from https://github.com/kbressem/LongHealth (data/) into "
      "manual_dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    q = {"no": _Text(), "question": _Text(), "correct": _Text(), "answer_location": _Text()}
    q.update({k: _Text() for k in benchmarks.LONGHEALTH_OPTION_KEYS})
    return tfds.core.DatasetInfo(
        builder=self,
        description="LongHealth patients with their clinical texts and MC questions.",
        features=tfds.features.FeaturesDict({
            "patient_id": _Text(), "name": _Text(), "birthday": _Text(), "diagnosis": _Text(),
            "texts": tfds.features.Sequence({"text_id": _Text(), "text": _Text()}),
            "questions": tfds.features.Sequence(q),
        }),
        homepage="https://github.com/kbressem/LongHealth",
        disable_shuffling=True)

  @staticmethod
  def _key(ex):
    return ex["patient_id"]


class Quality(_ManualBuilder):
  """QuALITY (Pang et al. 2022): long articles with 4-option MC questions."""
  name = "cas_quality"
  DATASET = "quality"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (manual_dir, array_record)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Unzip QuALITY.v1.0.1.zip from https://github.com/nyu-mll/quality (data/v1.0.1) and put "
      "QuALITY.v1.0.1.htmlstripped.{train,dev,test} into manual_dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="QuALITY question sets (one example per set; articles repeat).",
        features=tfds.features.FeaturesDict({
            "set_unique_id": _Text(), "article_id": _Text(), "title": _Text(),
            "author": _Text(), "source": _Text(), "topic": _Text(), "url": _Text(),
            "article": _Text(),
            "questions": tfds.features.Sequence({
                "question_unique_id": _Text(), "question": _Text(),
                "options": tfds.features.Tensor(shape=(benchmarks.QUALITY_NUM_OPTIONS,),
                                                dtype=np.str_),
                "gold_label": np.int32, "writer_label": np.int32, "difficult": np.bool_,
            }),
        }),
        homepage="https://github.com/nyu-mll/quality",
        disable_shuffling=True)

  @staticmethod
  def _key(ex):
    return ex["set_unique_id"]


class Qasper(_ManualBuilder):
  """QASPER (Dasigi et al. 2021): NLP papers with information-seeking questions."""
  name = "cas_qasper"
  DATASET = "qasper"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (manual_dir, array_record)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put qasper-{train,dev}-v0.3.json (qasper-train-dev-v0.3.tgz) and optionally "
      "qasper-test-v0.3.json from https://allenai.org/data/qasper into manual_dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="QASPER papers (paragraphs with section names) and questions; answers "
                    "are a JSON string holding the list of annotators' answer objects.",
        features=tfds.features.FeaturesDict({
            "paper_id": _Text(), "title": _Text(), "abstract": _Text(),
            "paragraphs": tfds.features.Sequence({"section_name": _Text(), "text": _Text()}),
            "qas": tfds.features.Sequence({"question_id": _Text(), "question": _Text(),
                                           "answers": _Text()}),
        }),
        homepage="https://allenai.org/data/qasper",
        disable_shuffling=True)

  @staticmethod
  def _key(ex):
    return ex["paper_id"]


BUILDERS = {"longhealth": LongHealth, "quality": Quality, "qasper": Qasper}


def prepare(dataset: str, manual_dir: str | os.PathLike,
            data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """Builds (once; later calls reuse the files) the tfds dataset and returns its builder."""
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(BUILDERS)}")
  builder = BUILDERS[dataset](data_dir=os.fspath(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return builder


def load_tfds_collection(dataset: str, manual_dir: str | os.PathLike,
                         data_dir: str | os.PathLike, split: str | None = None,
                         name: str | None = None) -> Collection:
  """Prepares the tfds dataset and converts `split` to a Collection (None: the only split)."""
  builder = prepare(dataset, manual_dir, data_dir)
  splits = sorted(builder.info.splits.keys())
  if split is None:
    if len(splits) != 1:
      raise CollectionError(f"{dataset}: several splits {splits}; pass split=")
    split = splits[0]
  if split not in splits:
    raise CollectionError(f"{dataset}: no split {split!r} (have {splits})")
  records = builder.as_data_source(split=split)
  return benchmarks.CONVERTERS[dataset]((records[i] for i in range(len(records))),
                                        name=name or f"{dataset}-{split}")
