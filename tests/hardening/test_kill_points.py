"""Kills at the exact commit point of a write (the child SIGKILLs itself right before the rename
that makes a shard, a checkpoint's checksum manifest or the store index visible): the resumed
job ends exactly like an uninterrupted one. Complements the random kills of test_kill_anywhere."""
import pytest

from tests.hardening.kill_harness import kill_at_commit


@pytest.mark.parametrize("job,die_at", [
    ("synth", "shard-00004.array_record"),  # shard fully written to its temp name, not renamed
    ("train", "cas_checksums.json#3"),      # Orbax checkpoint 6 complete, its checksums not yet
    ("cas", "*.rec#12"),                    # store pack written, its commit record not yet renamed in
])
def test_kill_at_commit_point_resumes_exactly(job, die_at, tmp_path_factory):
  root = str(tmp_path_factory.getbasetemp() / "kill_points")
  assert kill_at_commit(job, root=root, die_at=die_at) == []
