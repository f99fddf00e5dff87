"""Self-study: writes <workdir>/synth (sharded, resumable).

  python -m launch.synthesize --config=configs/cartridge.py:quickstart --workdir=runs/quickstart
"""

from launch.common import CONFIG, WORKDIR, run


def main(argv):
  del argv
  from cas import pipeline  # import after flag parsing
  pipeline.synth(CONFIG.value, WORKDIR.value)  # checks the config first


if __name__ == "__main__":
  run(main)
