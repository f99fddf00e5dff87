"""Cartridges at Scale on a collection: self-study, joint training with rotation, baselines, eval.

  python -m launch.cas --config=configs/cas.py:quick --workdir=runs/cas_quick
"""
from absl import app

from launch.common import CONFIG, WORKDIR


def main(argv):
  del argv
  from cas.cas_pipeline import run_cas_pipeline
  run_cas_pipeline(CONFIG.value, WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
