"""Cartridges at Scale on a collection: self-study, joint training with rotation, baselines, eval.

  python -m launch.cas --config=configs/cas.py:quick --workdir=runs/cas_quick
  python -m launch.cas --config=configs/cas.py:quick --workdir=runs/cas_quick --stages=synth

Every stage resumes where it stopped. `--stages` runs only some of them, in pipeline order
(e.g. `synth` once, then copy `<workdir>/synth` and `<workdir>/collection` to several workdirs
that train variants).
"""
from absl import app, flags

from launch.common import CONFIG, WORKDIR, run

STAGES = ("synth", "train", "train_isolated", "train_monolithic", "indexes", "evaluate")
_STAGES = flags.DEFINE_list("stages", ["all"], f"'all' or a subset of {','.join(STAGES)} (isolated/"
                            f"monolithic training run only when their methods are in config.eval.methods)")


def main(argv):
  del argv
  from cas.pipeline import run_cas_pipeline
  stages = _STAGES.value
  unknown = [s for s in stages if s != "all" and s not in STAGES]
  if unknown:
    raise app.UsageError(f"--stages: unknown {unknown}; choose from all,{','.join(STAGES)}")
  run_cas_pipeline(CONFIG.value, WORKDIR.value, stages=None if "all" in stages else tuple(stages))


if __name__ == "__main__":
  run(main)
