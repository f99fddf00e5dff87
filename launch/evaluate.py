"""Evaluates a finished pipeline run: every configured method, one report (never trains).

CAS configs (configs/cas.py; config.pipeline = "cas") run every method of config.eval.methods
(no_context, icl, cartridge_oracle, cas_composed@n, isolated_composed@n, icl_composed@n, monolithic,
cartridge_retrieved@k, rag_text@k, cartridge_gold_pair/<mode> on two-document questions, cartridge_init and
init_composed@n: the untrained cartridges alone and composed) and write <workdir>/eval/results.json, results.md (method table
+ retrieval recall@k) and PNG plots (accuracy vs prompt tokens / KV bytes, accuracy vs number of
loaded cartridges, recall@k), with a progress bar per method. Killed, the same command resumes:
finished methods are read back from <workdir>/eval/partial/.

  python -m launch.cas      --config=configs/cas.py:quick --workdir=runs/cas_quick   # train (+ eval)
  python -m launch.evaluate --config=configs/cas.py:quick --workdir=runs/cas_quick   # eval again

A benchmark instead of the built-in collection (source files in a local folder, read through the
tfds builders; see cas/data/sources.py), e.g. QuALITY's dev split or LongHealth:

  python -m launch.cas      --config=configs/cas.py:quick --config.data.kind=quality \
      --config.data.manual_dir=/data/quality --config.data.split=dev --workdir=runs/quality
  python -m launch.evaluate --config=configs/cas.py:quick --config.data.kind=quality \
      --config.data.manual_dir=/data/quality --config.data.split=dev --workdir=runs/quality

The one-document quickstart (configs/cartridge.py, the same pipeline on one document) the same way:

  python -m launch.evaluate --config=configs/cartridge.py:quickstart --workdir=runs/quickstart

A stage the methods need that has not finished (e.g. no CAS store yet) is an error naming it and
the pipeline command to run (cas.eval.stage_check.MissingStageError).
"""
import shlex
import sys


from launch.common import CONFIG, WORKDIR, run


def main(argv):
  del argv
  from cas.pipeline import evaluate_workdir  # after flag parsing
  command = " ".join(["python", "-m", "launch.cas"] + [shlex.quote(a) for a in sys.argv[1:] if a != "--verbose"])
  evaluate_workdir(CONFIG.value, WORKDIR.value, command=command)  # MissingStageError: launch/entry.py, status 4


if __name__ == "__main__":
  run(main)
