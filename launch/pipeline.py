"""Runs the whole pipeline: self-study, training and evaluation (each stage resumes).

  python -m launch.pipeline --config=configs/cartridge.py:quickstart --workdir=runs/quickstart

The same as `python -m launch.cas` (one pipeline, cas/pipeline.py); the one-document quickstart is
that pipeline on one document.
"""

from launch.common import CONFIG, WORKDIR, run


def main(argv):
  del argv
  from cas import pipeline  # import after flag parsing
  pipeline.run(CONFIG.value, WORKDIR.value)


if __name__ == "__main__":
  run(main)
