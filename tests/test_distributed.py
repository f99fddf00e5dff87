"""cas/distributed.py in one process: where the multi-process settings come from, refusing
incomplete ones, single-process no-op, host -> global arrays (8 fake CPU devices). The
two-process run itself is tests/test_multihost.py."""
import jax
import numpy as np
import pytest
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from cas import distributed as D
from cas.sharding import make_mesh

ENV = list(D.ENV_CAS.values()) + list(D.ENV_JAX.values()) + ["CAS_AUTO_DISTRIBUTED"]


@pytest.fixture
def clean_env(monkeypatch):
  for k in ENV:
    monkeypatch.delenv(k, raising=False)
  return monkeypatch


def _flags(argv):
  fv = flags.FlagValues()
  flags.DEFINE_string("coordinator_address", None, "", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "", flag_values=fv)
  fv(["prog"] + argv)
  return fv


def test_precedence_arguments_flags_cas_env_jax_env(clean_env):
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "jaxhost:1")
  clean_env.setenv("JAX_NUM_PROCESSES", "5")
  clean_env.setenv("JAX_PROCESS_ID", "4")
  s = D.resolve_settings()
  assert (s["coordinator_address"], s["num_processes"], s["process_id"]) == ("jaxhost:1", 5, 4)
  assert s["sources"]["num_processes"] == "JAX_NUM_PROCESSES"
  clean_env.setenv("CAS_COORDINATOR", "cashost:2")
  clean_env.setenv("CAS_NUM_PROCESSES", "3")
  s = D.resolve_settings()
  assert (s["coordinator_address"], s["num_processes"], s["process_id"]) == ("cashost:2", 3, 4)
  fv = _flags(["--num_processes=2", "--process_id=1"])
  s = D.resolve_settings(flag_values=fv)
  assert (s["coordinator_address"], s["num_processes"], s["process_id"]) == ("cashost:2", 2, 1)
  assert s["sources"] == {"coordinator_address": "CAS_COORDINATOR", "num_processes": "--num_processes",
                          "process_id": "--process_id"}
  s = D.resolve_settings(coordinator_address="arg:3", process_id=0, flag_values=fv)
  assert (s["coordinator_address"], s["num_processes"], s["process_id"]) == ("arg:3", 2, 0)
  clean_env.setenv("CAS_PROCESS_ID", "one")
  with pytest.raises(D.DistributedError, match="process_id from CAS_PROCESS_ID must be an int, got 'one'"):
    D.resolve_settings()


def test_single_process_is_a_no_op(clean_env):
  assert D.maybe_initialize() is False
  assert D.maybe_initialize(num_processes=1) is False
  clean_env.setenv("CAS_NUM_PROCESSES", "1")
  assert D.maybe_initialize() is False
  assert not D.is_initialized() and jax.process_count() == 1


def test_incomplete_or_bad_settings_are_refused(clean_env):
  clean_env.setenv("CAS_COORDINATOR", "localhost:1234")
  with pytest.raises(D.DistributedError, match=r"incomplete.*no \['num_processes', 'process_id'\]"):
    D.maybe_initialize()
  with pytest.raises(D.DistributedError, match=r"process_id=2 \(argument\) must be in \[0, num_processes=2\)"):
    D.maybe_initialize(num_processes=2, process_id=2)
  assert not D.is_initialized()


def test_host_to_global_and_fetch():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  sh = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
  g = D.host_to_global(x, sh)
  assert g.sharding == sh and g.shape == x.shape and g.dtype == x.dtype
  assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(D.fetch(g), x)
  t = D.tree_to_global({"a": x, "b": x[:, 0].astype(np.int32)},
                       {"a": sh, "b": NamedSharding(mesh, P("data"))})
  assert t["b"].dtype == np.int32 and t["b"].sharding.spec == P("data")
  np.testing.assert_array_equal(D.fetch(t["b"]), x[:, 0])
