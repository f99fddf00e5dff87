"""benchmarks/compose_study.py's plan: a training lever shares its collection's self-study set, a
self-study lever (qmix) gets its own set and the full CAS + isolated evaluation; bad flags fail."""
import pytest

from benchmarks import compose_study as cs


def test_self_study_levers_get_their_own_set_and_the_full_evaluation(tmp_path):
  p = cs.plan(str(tmp_path), cs._flags(["--variants=base,qmix,hard", "--collections=minutes", "--seeds=0,1"]))
  synth = {j["name"]: j for j in p["synth"]}
  assert set(synth) == {"minutes_s0", "minutes_s1", "qmix_minutes_s0", "qmix_minutes_s1"}
  assert any("--config.synth.families=('quote','quote','quote','question')" == a for a in synth["qmix_minutes_s1"]["args"])
  assert not any(a.startswith("--config.synth.families") for a in synth["minutes_s1"]["args"])
  train = {j["name"]: j for j in p["train"]}
  assert train["qmix_minutes_s1"]["synth"] == "qmix_minutes_s1" and train["hard_minutes_s1"]["synth"] == "minutes_s1"
  methods = lambda j: next(a for a in j["args"] if a.startswith("--config.eval.methods="))
  assert "isolated_composed" in methods(train["qmix_minutes_s0"]) and "isolated_composed" in methods(train["base_minutes_s0"])
  assert "isolated_composed" not in methods(train["hard_minutes_s0"])
  assert "rag_text" in methods(train["base_minutes_s0"]) and "cartridge_adaptive" in methods(train["base_minutes_s0"])


def test_bad_flags_fail_before_anything_runs():
  with pytest.raises(SystemExit, match="unknown variant 'nope'"):
    cs._flags(["--variants=base,nope"])
  with pytest.raises(SystemExit, match="unknown flag --step"):
    cs._flags(["--step=3"])


def test_an_extra_flag_replaces_the_recipes_value():
  """ml_collections extends a tuple field given twice: --extra's retrieval_k must replace the
  recipe's (1,2), not follow it (which gave (1,2,1,2,4,8))."""
  p = cs.plan("/tmp/x", cs._flags(["--variants=base", "--collections=patients", "--seeds=0",
                                   "--extra=--config.eval.retrieval_k=(1,2,4,8)"]))
  for job in p["synth"] + p["train"]:
    rk = [a for a in job["args"] if a.startswith("--config.eval.retrieval_k=")]
    assert rk == ["--config.eval.retrieval_k=(1,2,4,8)"]


def test_methods_flag_narrows_the_base_runs_and_refuses_unknown_methods():
  p = cs.plan("/tmp/x", cs._flags(["--variants=base,hard", "--collections=minutes", "--seeds=0",
                                   "--methods=cartridge_oracle,cas_composed,isolated_composed"]))
  train = {j["name"]: j for j in p["train"]}
  methods = lambda j: next(a for a in j["args"] if a.startswith("--config.eval.methods="))
  assert methods(train["base_minutes_s0"]) == "--config.eval.methods=('cartridge_oracle','cas_composed','isolated_composed')"
  assert methods(train["hard_minutes_s0"]) == "--config.eval.methods=('cartridge_oracle','cas_composed')"  # levers: theirs
  with pytest.raises(SystemExit, match="--methods has rag"):
    cs._flags(["--methods=icl,rag"])


def test_every_method_compose_study_knows_is_a_pipeline_method():
  from cas.eval.cas_methods import METHODS
  assert set(cs.KNOWN_METHODS) <= set(METHODS)


def test_the_head_lever_shares_the_base_self_study_and_trains_the_isolated_baseline_too():
  p = cs.plan("/tmp/x", cs._flags(["--variants=base,head32", "--collections=minutes", "--seeds=0"]))
  train = {j["name"]: j for j in p["train"]}
  assert train["head32_minutes_s0"]["synth"] == "minutes_s0"
  assert "--config.train.frozen_head=32" in train["head32_minutes_s0"]["args"]
  methods = next(a for a in train["head32_minutes_s0"]["args"] if a.startswith("--config.eval.methods="))
  assert "isolated_composed" in methods


def test_the_sequential_lever_replaces_the_recipes_position_modes_and_trains_both():
  """`seq` trains and evaluates in sequential positions: its eval.position_modes replaces the recipe's
  ('shared',) instead of extending it (the report would then read the shared rows), for CAS and isolated."""
  p = cs.plan("/tmp/x", cs._flags(["--variants=seq", "--collections=patients", "--seeds=1"]))
  args = p["train"][0]["args"]
  assert [a for a in args if a.startswith("--config.eval.position_modes=")] == [
      "--config.eval.position_modes=('sequential',)"]
  assert "--config.train.position_mode=sequential" in args
  assert "isolated_composed" in next(a for a in args if a.startswith("--config.eval.methods="))


def test_self_study_processes_get_their_own_memory_share(tmp_path):
  p = cs.plan(str(tmp_path), cs._flags(["--variants=base", "--collections=minutes", "--seeds=0", "--mem=0.04",
                                        "--synth_mem=0.06"]))
  assert [0.04 * j.get("mem", 1.0) for j in p["synth"]] == pytest.approx([0.06])
  assert all(j.get("mem", 1.0) == 1.0 for j in p["train"])
  p = cs.plan(str(tmp_path), cs._flags(["--variants=base", "--collections=minutes", "--seeds=0"]))
  assert all("mem" not in j for j in p["synth"])  # default: the same share as a training


def test_only_runs_a_variant_on_the_collections_it_names():
  p = cs.plan("/tmp/x", cs._flags(["--variants=base,salient", "--collections=patients,products,minutes",
                                   "--seeds=0,1", "--only=salient:minutes"]))
  names = {j["name"] for j in p["train"]}
  assert {f"salient_{c}_s{s}" for c in ("minutes",) for s in (0, 1)} <= names
  assert not any(n.startswith("salient_") and "minutes" not in n for n in names)
  assert {f"base_{c}_s{s}" for c in ("patients", "products", "minutes") for s in (0, 1)} <= names
  assert len(names) == 8 and len(p["synth"]) == 6
  with pytest.raises(SystemExit, match="does not run"):
    cs._flags(["--variants=base", "--only=salient:minutes"])
  with pytest.raises(SystemExit, match="not in"):
    cs._flags(["--variants=base,salient", "--collections=minutes", "--only=salient:patients"])


def test_disk_reservation_counts_what_running_trainings_may_still_write():
  f = cs._flags(["--p=512"])
  assert cs.disk_gb(f) == 0.02 * 512 and cs.disk_gb(cs._flags(["--disk_gb=3.5"])) == 3.5
  gb = 1e9
  assert cs.disk_fits(10, 64 * gb, [])
  assert not cs.disk_fits(10, 64 * gb, [0] * 6)  # six fresh runs may still write 60 GB
  assert cs.disk_fits(10, 64 * gb, [8 * gb] * 6)  # ... but they already wrote most of it
  assert cs.disk_fits(10, 30 * gb, [12 * gb])  # a run past its estimate reserves nothing more


def test_a_run_out_of_device_memory_runs_once_more_with_twice_its_share(tmp_path, monkeypatch):
  """The scheduler with real processes: 'oom' fails out of memory once (its log kept as oom.oom.log) and
  succeeds at 2x its share; 'bad' fails with another error and is not retried; 'oom2' runs out twice."""
  import json
  import subprocess
  import sys
  root = str(tmp_path)
  jobs = [{"name": n, "args": [], "mem": 1.0} for n in ("oom", "bad", "oom2")]
  json.dump({"flags": {"procs": "3", "mem": "0.1", "mem_total": "0.3", "p": "16", "disk_gb": "0"},
             "synth": [], "train": jobs}, open(tmp_path / "plan.json", "w"))
  shares = []

  def fake_launch(job, root_, mem):
    shares.append((job["name"], mem))
    first = not (tmp_path / f"{job['name']}.ran").exists()
    (tmp_path / f"{job['name']}.ran").write_text("x")
    msg, rc = {"oom": ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory", 1 if first else 0),
               "bad": ("ValueError: something else", 1), "oom2": ("RESOURCE_EXHAUSTED", 1)}[job["name"]]
    log = open(tmp_path / f"{job['name']}.log", "w")
    return subprocess.Popen([sys.executable, "-c", f"print({msg!r}); raise SystemExit({rc})"], stdout=log)
  monkeypatch.setattr(cs, "_launch", fake_launch)
  monkeypatch.setattr(cs, "POLL_S", 0.05)
  cs.schedule(root)
  st = json.load(open(tmp_path / "status.json"))["state"]
  assert st["oom"].startswith("done") and "retried after an OOM" in st["oom"] and "0.200" in st["oom"]
  assert st["bad"].startswith("failed rc=1") and "retried" not in st["bad"]
  assert st["oom2"].startswith("failed rc=1") and "retried" in st["oom2"]
  assert sorted(shares) == [("bad", "0.100"), ("oom", "0.100"), ("oom", "0.200"), ("oom2", "0.100"), ("oom2", "0.200")]
  assert "RESOURCE_EXHAUSTED" in (tmp_path / "oom.oom.log").read_text()


def test_a_failed_job_says_why_and_a_python_without_the_packages_is_refused(tmp_path, capsys, monkeypatch):
  """The end of `wait` prints each failed job's last error lines; `start` refuses a python that cannot
  import ml_collections (2026-12-06: every job of a study failed at once for it) before planning anything."""
  import subprocess
  import sys
  (tmp_path / "synth_a_s0.log").write_text("step 1\nModuleNotFoundError: No module named 'ml_collections'\n")
  cs._failures(str(tmp_path), {"synth_a_s0": "failed rc=1 3s", "base_a_s0": "skipped (self-study failed)",
                               "base_b_s0": "failed rc=2 1s"})
  out = capsys.readouterr().out
  assert "synth_a_s0 failed rc=1 3s: ModuleNotFoundError: No module named 'ml_collections'" in out
  assert "base_b_s0 failed rc=2 1s: (no log)" in out and "base_a_s0" not in out
  assert cs._jobs_can_import() is None  # this venv has them
  real = subprocess.run
  monkeypatch.setattr(cs.subprocess, "run", lambda args, **kw: real([sys.executable, "-c", "import no_such_module_x"], **kw))
  assert "no_such_module_x" in cs._jobs_can_import()
  with pytest.raises(SystemExit, match="cannot import what the jobs need"):
    cs.main(["compose_study.py", "start", str(tmp_path / "study"), "--variants=base"])
  assert not (tmp_path / "study").exists()


def test_the_parts_lever_gets_its_own_self_study_copied_and_archived_from_its_parts_directory(tmp_path):
  """parts1k (documents over 1,024 tokens cut into parts) makes its own self-study (per part), trains and
  evaluates like base; a training run gets the synth job's collection and parts1024/ directory, and the
  archive takes its results from parts1024/eval as <run>/eval/results.json (what compose_report reads)."""
  import tarfile
  p = cs.plan(str(tmp_path), cs._flags(["--variants=base,parts1k", "--collections=minutes", "--seeds=0"]))
  synth = {j["name"]: j for j in p["synth"]}
  assert set(synth) == {"minutes_s0", "parts1k_minutes_s0"}
  assert "--config.cartridge.max_doc_tokens=1024" in synth["parts1k_minutes_s0"]["args"]
  assert "--config.synth.conversations=64" in synth["parts1k_minutes_s0"]["args"]  # the variant's, not --conv
  assert not any("max_doc_tokens" in a for a in synth["minutes_s0"]["args"])
  train = {j["name"]: j for j in p["train"]}
  assert train["parts1k_minutes_s0"]["synth"] == "parts1k_minutes_s0"
  assert any("isolated_composed" in a for a in train["parts1k_minutes_s0"]["args"])
  src, wd = tmp_path / "synth_parts1k_minutes_s0", tmp_path / "parts1k_minutes_s0"
  for f in ("collection/docs.jsonl", "parts1024/synth/manifest.json"):
    (src / f).parent.mkdir(parents=True, exist_ok=True)
    (src / f).write_text(f)
  wd.mkdir()
  cs.copy_self_study(str(src), str(wd))
  assert (wd / "parts1024/synth/manifest.json").read_text() == "parts1024/synth/manifest.json"
  assert (wd / "collection/docs.jsonl").exists() and not (wd / "synth").exists()
  (wd / "parts1024/eval").mkdir()
  (wd / "parts1024/eval/results.json").write_text('{"methods": []}')
  base = tmp_path / "base_minutes_s0" / "eval"
  base.mkdir(parents=True)
  (base / "results.json").write_text('{"methods": [1]}')
  with tarfile.open(cs.archive(str(tmp_path), str(tmp_path / "out"))) as t:
    assert t.extractfile("parts1k_minutes_s0/eval/results.json").read() == b'{"methods": []}'
    assert t.extractfile("base_minutes_s0/eval/results.json").read() == b'{"methods": [1]}'


def test_variants_with_the_same_self_study_share_one_synth_job(tmp_path):
  """parts1k_sal (parts1k with salient inits) trains on parts1k's self-study: one synth job per collection and
  seed for both, and a variant alone still gets its own."""
  p = cs.plan(str(tmp_path), cs._flags(["--variants=base,parts1k,parts1k_sal", "--collections=minutes", "--seeds=0"]))
  assert [s["name"] for s in p["synth"]] == ["minutes_s0", "parts1k_minutes_s0"]
  train = {t["name"]: t for t in p["train"]}
  assert train["parts1k_sal_minutes_s0"]["synth"] == "parts1k_minutes_s0"
  assert "--config.cartridge.init_text=salient" in train["parts1k_sal_minutes_s0"]["args"]
  assert "--config.cartridge.init_text=salient" not in train["parts1k_minutes_s0"]["args"]
  alone = cs.plan(str(tmp_path), cs._flags(["--variants=parts1k_sal", "--collections=minutes", "--seeds=0"]))
  assert [s["name"] for s in alone["synth"]] == ["parts1k_sal_minutes_s0"]
  assert alone["train"][0]["synth"] == "parts1k_sal_minutes_s0"


def test_the_bare_lever_writes_its_own_self_study_in_the_bare_format_and_trains_cas_only(tmp_path):
  """seqbare (issue 26): the student prompts change with the prompt format, so it gets its own self-study set
  made with --config.prompt_format=bare (the training runs in the same format); CAS only, its no_context too."""
  p = cs.plan(str(tmp_path), cs._flags(["--variants=seq,seqbare", "--collections=minutes,patients", "--seeds=0",
                                        "--only=seq:minutes"]))
  synth = {j["name"]: j for j in p["synth"]}
  assert set(synth) == {"minutes_s0", "seqbare_minutes_s0", "seqbare_patients_s0"}
  assert "--config.prompt_format=bare" in synth["seqbare_patients_s0"]["args"]
  assert not any(a.startswith("--config.prompt_format") for a in synth["minutes_s0"]["args"])
  train = {j["name"]: j for j in p["train"]}
  assert set(train) == {"seq_minutes_s0", "seqbare_minutes_s0", "seqbare_patients_s0"}
  bare = train["seqbare_patients_s0"]
  assert bare["synth"] == "seqbare_patients_s0" and "--config.prompt_format=bare" in bare["args"]
  assert "--config.train.position_mode=sequential" in bare["args"]
  assert "--config.eval.methods=('cartridge_oracle','cas_composed','icl','no_context','cartridge_init','init_composed')" \
      in bare["args"]


def test_seq768_plans_train_at_p768_on_their_own_or_the_base_self_study(tmp_path):
  """seq768 (issue 26, the window) trains on the base self-study at p = 768 (the variant's flag replaces the
  recipe's num_tokens instead of following it); seq768b on its own bare self-study; both CAS only and given
  1.5x a p = 512 run's memory."""
  p = cs.plan(str(tmp_path), cs._flags(["--variants=seq768,seq768b", "--collections=patients", "--seeds=0,1",
                                        "--p=512"]))
  assert {j["name"] for j in p["synth"]} == {"patients_s0", "patients_s1", "seq768b_patients_s0",
                                              "seq768b_patients_s1"}
  train = {j["name"]: j for j in p["train"]}
  for v in ("seq768", "seq768b"):
    args = train[f"{v}_patients_s1"]["args"]
    assert [a for a in args if a.startswith("--config.cartridge.num_tokens=")] == ["--config.cartridge.num_tokens=768"]
    assert train[f"{v}_patients_s1"]["mem"] == 1.5
    assert not any("isolated" in a for a in args if a.startswith("--config.eval.methods="))
  assert train["seq768_patients_s0"]["synth"] == "patients_s0"
  assert train["seq768b_patients_s0"]["synth"] == "seq768b_patients_s0"


def test_every_method_the_study_names_is_one_the_pipeline_knows():
  """--methods (e.g. lease.sh's PARTS_METHODS with cartridge_init, refused before 2026-12-07) and the levers'
  extra methods are methods of cas.config_check.CAS_METHODS, and --methods accepts the no-training rows."""
  from cas.config_check import CAS_METHODS
  assert set(cs.KNOWN_METHODS) <= set(CAS_METHODS)
  assert all(set(m) <= set(cs.KNOWN_METHODS) for m in cs.LEVER_EXTRA_METHODS.values())
  f = cs._flags(["--variants=parts1k_sal", "--methods=no_context,icl,cartridge_oracle,cartridge_init,cas_composed,"
                 "isolated_composed,init_composed"])
  assert "cartridge_init" in f["methods"] and "init_composed" in f["methods"]


def test_the_blend_levers_train_as_the_bare_ones_and_score_three_blends(tmp_path):
  """seqblend / blend768 (the trained cartridges blended with their inits): seqbare's / seq768b's training, CAS
  only, with the blend rows at three alphas beside the untrained and trained ones; both share seqbare's bare
  self-study when it runs (p is not a self-study flag), and blend768 gets seq768b's memory."""
  p = cs.plan(str(tmp_path), cs._flags(["--variants=seqbare,seqblend,blend768", "--collections=products",
                                        "--seeds=0", "--p=512"]))
  assert {j["name"] for j in p["synth"]} == {"seqbare_products_s0"}
  train = {j["name"]: j for j in p["train"]}
  blend = train["seqblend_products_s0"]
  assert blend["synth"] == train["blend768_products_s0"]["synth"] == "seqbare_products_s0"
  assert "--config.eval.blend_alphas=(0.25,0.5,0.75)" in blend["args"] and "--config.prompt_format=bare" in blend["args"]
  methods = next(a for a in blend["args"] if a.startswith("--config.eval.methods="))
  assert "'cartridge_oracle','cas_composed','cartridge_init','cartridge_blend'" in methods
  assert methods.endswith("'init_composed','blend_composed')") and "isolated" not in methods
  assert train["blend768_products_s0"]["mem"] == 1.5
  assert "--config.cartridge.num_tokens=768" in train["blend768_products_s0"]["args"]
  short = cs.plan(str(tmp_path), cs._flags(["--variants=seqblend,blend300", "--collections=products", "--seeds=0",
                                            "--steps=1000"]))["train"]
  steps = {j["name"]: [a for a in j["args"] if a.startswith("--config.train.steps=")] for j in short}
  assert steps == {"seqblend_products_s0": ["--config.train.steps=1000"], "blend300_products_s0": ["--config.train.steps=300"]}


def test_the_anchor_levers_train_as_seqbare_with_the_pull_toward_the_init(tmp_path):
  """anch3 / anch30 (train.anchor_weight 3 and 30): seqbare's recipe on its bare self-study, CAS only, with the
  untrained rows beside the trained ones."""
  p = cs.plan(str(tmp_path), cs._flags(["--variants=seqblend,anch3,anch30", "--collections=products", "--seeds=0",
                                        "--p=512"]))
  assert {j["name"] for j in p["synth"]} == {"seqblend_products_s0"}
  train = {j["name"]: j for j in p["train"]}
  for v, w in (("anch3", "3.0"), ("anch30", "30.0")):
    args = train[f"{v}_products_s0"]["args"]
    assert train[f"{v}_products_s0"]["synth"] == "seqblend_products_s0"
    assert f"--config.train.anchor_weight={w}" in args and "--config.prompt_format=bare" in args
    methods = next(a for a in args if a.startswith("--config.eval.methods="))
    assert "cartridge_init" in methods and "isolated" not in methods
