"""Serving documents cut into parts (cartridge.max_doc_tokens, issue 26): the workdir's parts<M>
run is found (ambiguity and absence named), a document id loads all of its parts' cartridges in
part order, composed as the evaluation composes them (greedy output equals the cas Sampler's with
the parts concatenated by cas.cartridge.compose), a part id loads one part, unknown documents and
documents with untrained parts are 404s naming them, retrieval of a whole document loads its parts."""
from __future__ import annotations

import os

import jax.numpy as jnp
import pytest

from cas.cartridge.compose import compose
from cas.model.llama import Prefix
from cas.model.sampler import Sampler
from cas.rotation.store import StoreError
from cas.serve import ChatRequest, Engine, ServeError, open_collections, store_of_workdir

Q = [{"role": "user", "content": "Who drew the atlas of Quill Bay?"}]


def test_store_of_workdir_finds_parts_runs(parts_world, world, tmp_path):
  w, m = parts_world.workdir, parts_world.max_doc_tokens
  assert store_of_workdir(w, m) == parts_world.parts_store
  assert store_of_workdir(w, 0) == parts_world.whole_store
  with pytest.raises(StoreError) as e:  # two runs: ambiguous, both named, the flag to choose
    store_of_workdir(w)
  assert parts_world.whole_store in str(e.value) and parts_world.parts_store in str(e.value)
  assert "--max_doc_tokens" in str(e.value) and f"max_doc_tokens={m}" in str(e.value)
  with pytest.raises(StoreError) as e:  # a run that is not there: the paths looked at and those there
    store_of_workdir(w, m + 1)
  assert os.path.join(w, f"parts{m + 1}", "cas", "store") in str(e.value)
  assert parts_world.parts_store in str(e.value)
  # a workdir holding only the parts run: found without asking
  only = tmp_path / "only"
  os.makedirs(only)
  os.symlink(os.path.dirname(os.path.dirname(parts_world.parts_store)), only / f"parts{m}")
  assert store_of_workdir(str(only)) == str(only / f"parts{m}" / "cas" / "store")
  assert store_of_workdir(world.workdir) == world.store_dir  # whole documents only, as before
  with pytest.raises(StoreError, match="parts<M>"):
    store_of_workdir(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def parts_engine(parts_world):
  colls = open_collections(model_fingerprint=parts_world.lm.fingerprint, workdir=parts_world.workdir,
                           max_doc_tokens=parts_world.max_doc_tokens)
  eng = Engine(parts_world.lm.model, parts_world.lm.tokenizer, colls, model_name="tiny-smol", cache_size=8,
               max_batch=4, max_context=256, default_max_tokens=10, batch_wait_s=0.005, prompt_format="chat")
  eng.start()
  yield eng
  eng.close()


def reference(world, engine, units, max_new, mode="shared"):
  """Greedy text of the cas Sampler after `units`' cartridges, loaded from the store directly and
  concatenated as the evaluation concatenates a document's parts (compose of all, in order)."""
  lm, coll = world.lm, engine.default_collection
  k, v, off = compose([coll.store.export_cartridge(u, *coll.frozen()) for u in units], mode=mode,
                      inv_freq=lm.model.inv_freq[...])  # [L, F + n(P-F), Hkv, D] f32
  prefix = Prefix(k[:, None], v[:, None], jnp.ones((1, k.shape[1]), bool))
  gen = Sampler(lm.model, pad_id=lm.tokenizer.pad_id).generate(
      [lm.tokenizer.apply_chat_template(Q)], max_new_tokens=max_new, prefix=prefix, position_offset=off,
      stop_ids=lm.tokenizer.eos_ids)[0]
  return lm.tokenizer.decode([t for t in gen.tokens.tolist() if t not in lm.tokenizer.eos_ids])


@pytest.mark.parametrize("mode", ["shared", "sequential"])
def test_a_document_loads_its_parts_in_order(parts_world, parts_engine, mode):
  doc = "doc_atlas"
  parts = parts_world.parts_of[doc]  # cas.data.parts' own split: doc_atlas#1..#3
  coll = parts_engine.default_collection
  assert coll.units(doc) == parts == [f"{doc}#{i}" for i in (1, 2, 3)]
  out = parts_engine.complete(ChatRequest(messages=Q, cartridges=["doc_bell", doc], position_mode=mode,
                                          temperature=0.0, max_tokens=10))
  want = reference(parts_world, parts_engine, ["doc_bell"] + parts, 10, mode)
  assert out["text"] == want and want
  assert out["cartridges"] == [{"collection": "partsrun", "doc_id": "doc_bell"},
                               {"collection": "partsrun", "doc_id": doc, "parts": parts}]
  prep = parts_engine.prepare(ChatRequest(messages=Q, cartridges=[doc], position_mode=mode))
  spec = parts_world.spec
  body = spec.num_tokens - spec.num_frozen
  assert prep.unit_ids() == parts
  assert prep.position_offset == (spec.num_tokens if mode == "shared" else spec.num_frozen + 3 * body)
  if mode == "sequential":  # the order matters here: the parts reversed give another answer
    assert want != reference(parts_world, parts_engine, ["doc_bell"] + parts[::-1], 10, mode)


def test_a_part_id_loads_that_part_alone(parts_world, parts_engine):
  out = parts_engine.complete(ChatRequest(messages=Q, cartridges=["doc_atlas#2"], temperature=0.0, max_tokens=10))
  assert out["text"] == reference(parts_world, parts_engine, ["doc_atlas#2"], 10)
  assert out["cartridges"] == [{"collection": "partsrun", "doc_id": "doc_atlas#2"}]
  whole = parts_engine.complete(ChatRequest(messages=Q, cartridges=["doc_atlas"], temperature=0.0, max_tokens=10))
  assert whole["text"] != out["text"]  # the other parts reach the model too


def test_unknown_documents_and_missing_parts_are_404(parts_engine):
  def err(ids) -> ServeError:
    with pytest.raises(ServeError) as e:
      parts_engine.prepare(ChatRequest(messages=Q, cartridges=ids))
    return e.value
  e = err(["doc_atlas", "doc_nope"])
  assert (e.status, e.code, e.param) == (404, "cartridge_not_found", "cartridges")
  assert "doc_nope" in e.message and "doc_atlas'" not in e.message and "'<doc_id>#<i>'" in e.message
  e = err(["doc_half"])  # part 2 registered but never trained
  assert e.status == 404 and "doc_half" in e.message and "['doc_half#2']" in e.message
  assert err(["doc_atlas#4"]).status == 404


def test_retrieval_loads_the_parts_and_collections_count_documents(parts_engine):
  prep = parts_engine.prepare(ChatRequest(messages=[{"role": "user", "content": "Who drew the atlas of Quill "
                                                     "Bay and where are its plates?"}], collection="partsrun", top_k=1))
  assert prep.doc_ids == ["doc_atlas"] and prep.unit_ids() == ["doc_atlas#1", "doc_atlas#2", "doc_atlas#3"]
  assert prep.cartridge_info()[0]["parts"] == prep.unit_ids() and prep.cartridge_info()[0]["score"] > 0
  coll = parts_engine.default_collection
  assert coll.documents() == {"doc_atlas": prep.unit_ids(), "doc_bell": ["doc_bell"]}  # doc_half incomplete
  assert not coll.servable("doc_half") and coll.servable("doc_atlas#2") and coll.servable("doc_bell")


def test_http_api_serves_parts(parts_world, parts_engine):
  openai = pytest.importorskip("openai")
  pytest.importorskip("fastapi")
  import http.client
  import json

  from cas.serve.api import ServerThread, create_app
  with ServerThread(create_app(parts_engine)) as srv:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="tiny-smol", messages=Q, temperature=0.0, max_tokens=10,
                                       extra_body={"cartridges": ["doc_atlas"]})
    assert r.choices[0].message.content == reference(parts_world, parts_engine, parts_world.parts_of["doc_atlas"], 10)
    assert r.model_extra["cartridges"][0]["parts"] == parts_world.parts_of["doc_atlas"]
    with pytest.raises(openai.NotFoundError) as e:
      client.chat.completions.create(model="tiny-smol", messages=Q, extra_body={"cartridges": ["doc_nope"]})
    assert e.value.status_code == 404 and "doc_nope" in str(e.value)
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    conn.request("GET", "/v1/cas/collections")
    colls = json.loads(conn.getresponse().read())["data"]
    conn.close()
    assert [(c["name"], c["num_documents"], c["documents_in_parts"], c["num_cartridges"]) for c in colls] == [
        ("partsrun", 2, 1, 5)]  # doc_atlas (3 parts) and doc_bell; cartridges: those 4 + doc_half#1


def test_launch_serve_names_the_runs_of_an_ambiguous_workdir(parts_world, world):
  """launch.serve --workdir with two runs stops before loading the model, naming both stores and
  --max_doc_tokens; a --max_doc_tokens with no such run names the stores that are there."""
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "launch.serve", f"--workdir={parts_world.workdir}",
                      f"--model_path={world.model_dir}", "--max_doc_tokens=3"], cwd=repo, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "max_doc_tokens=3" in r.stderr and parts_world.parts_store in r.stderr
  r = subprocess.run([sys.executable, "-m", "launch.serve", f"--workdir={parts_world.workdir}",
                      f"--model_path={world.model_dir}"], cwd=repo, env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert parts_world.whole_store in r.stderr and parts_world.parts_store in r.stderr and "--max_doc_tokens" in r.stderr
