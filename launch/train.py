"""Trains the cartridges on <workdir>/synth; checkpoints, logs and the store in <workdir>/cas
(resumable); with one document its cartridge is also exported to <workdir>/cas/cartridge.

  python -m launch.train --config=configs/cartridge.py:quickstart --workdir=runs/quickstart
"""

from launch.common import CONFIG, WORKDIR, run


def main(argv):
  del argv
  from cas import pipeline  # import after flag parsing
  pipeline.train(CONFIG.value, WORKDIR.value)  # checks the config first


if __name__ == "__main__":
  run(main)
