"""Runs self-study, training and evaluation for one document (each stage resumes).

  python -m launch.pipeline --config=configs/cartridge.py:quickstart --workdir=runs/quickstart
"""

from launch.common import CONFIG, WORKDIR, run


def main(argv):
  del argv
  from cas.pipeline import Stages, run_cartridge_pipeline  # noqa: F401  (import after flag parsing)
  run_cartridge_pipeline(CONFIG.value, WORKDIR.value)


if __name__ == "__main__":
  run(main)
