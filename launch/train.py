"""Trains the cartridge on <workdir>/synth; checkpoints in <workdir>/train (resumable).

  python -m launch.train --config=configs/cartridge.py:quickstart --workdir=runs/quickstart
"""

from launch.common import CONFIG, WORKDIR, run


def main(argv):
  del argv
  from cas.pipeline import Stages, run_cartridge_pipeline  # noqa: F401  (import after flag parsing)
  Stages(CONFIG.value, WORKDIR.value, stages=("train",)).train()  # checks the config first


if __name__ == "__main__":
  run(main)
