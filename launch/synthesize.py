"""Self-study: writes <workdir>/synth (sharded, resumable).

  python -m launch.synthesize --config=configs/cartridge.py:quickstart --workdir=runs/quickstart
"""

from launch.common import CONFIG, WORKDIR, run


def main(argv):
  del argv
  from cas.pipeline import Stages, run_cartridge_pipeline  # noqa: F401  (import after flag parsing)
  Stages(CONFIG.value, WORKDIR.value, stages=("synth",)).synth()  # checks the config first


if __name__ == "__main__":
  run(main)
