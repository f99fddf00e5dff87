"""Kill anywhere (issue 11.1): SIGKILL synthesis, single-cartridge training and a rotating CAS run
at random moments; each resumes and ends exactly like an uninterrupted run (same losses, same
conversations, same store contents, same checkpoints, no temp files). Two kills per job here (the suite's time);
the full run is `python -m tests.hardening.kill_harness --job=all --kills=20 --seed=0`
(numbers in docs/BAD_INPUT.md)."""
import pytest

from tests.hardening.kill_harness import run_job


@pytest.mark.parametrize("job", ["synth", "train", "cas"])
def test_killed_job_resumes_to_the_same_result(job, tmp_path_factory):
  root = str(tmp_path_factory.getbasetemp() / "kill_harness")  # inputs shared by train and cas
  rep = run_job(job, kills=2, seed=0, root=root, shared_cache=True, verbose=False)
  print(rep.line())
  assert rep.kills_landed == 2 and rep.resumes == 2, rep.kill_log
  assert rep.rounds >= 1  # at least one killed history ran to completion and was compared
  assert rep.mismatches == [], rep.mismatches
