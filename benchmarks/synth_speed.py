"""Issue 7.2: self-study synthesis speed, cas `Sampler` vs transformers `generate`, same run.

Same random-weight model shape (default Llama-3.2-1B, bf16), same prompts (random ids from the
same numpy generator, all of `--prompt_len` tokens: a self-study prompt is a system chunk of the
document plus the seed message), same batch, temperature-1 sampling, `--new_tokens` generated
per row (EOS never stops a row: cas gets no stop ids, transformers eos_token_id=None), top-20
log-probs of every generated position returned to the host.

  * cas: `Sampler.generate(prompts, max_new_tokens, temperature=1, top_k_logprobs=20)`: one jitted
    prefill + `while_loop` decode; compile excluded by a first call with the same buckets.
  * torch (subprocess started first, `benchmarks/torch_baselines.py generate`):
    `model.generate(do_sample=True, output_scores=True, return_dict_in_generate=True)` then the
    top-20 of log_softmax(scores) ("scores"), and a LogitsProcessor recording the top-20 per step
    ("processor"); SDPA attention, a warm-up call first.
Reported: generated tokens/s (batch * new_tokens / wall time of the call, prefill included on
both sides) and cas / torch for each torch mode (target >= 3x).

Shared document (issue 22.1, self-study's real shape): `--shared_doc=N` makes every cas prompt
start with the same N tokens (the document) followed by `prompt_len - N` random tokens, and cas
runs `Sampler.generate_shared` (the document prefilled once as a batch-1 prefix) once per
`--shared_prefix` mode: "once" (the prefix attended once per step for the whole batch) and
"broadcast" (copied to every row: the earlier path), same call, same prompts. The torch side
still gets `prompt_len` random tokens per prompt (same lengths, same work: no prefix caching).
Pick `prompt_len - N` as a prompt bucket (e.g. 64) so the tails carry no padding.

  python -m benchmarks.synth_speed --model=llama-3.2-1b --batch=64 --prompt_len=1024 --new_tokens=256
  python -m benchmarks.synth_speed --model=smollm2-135m --batch=64 --prompt_len=2112 --shared_doc=2048 \
      --new_tokens=256 --shared_prefix=broadcast,once --torch=false
  python -m benchmarks.synth_speed --smoke
"""
from __future__ import annotations

import os
import time

from benchmarks import _common as C  # first: sets up cas.model imports and the memory fraction

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from cas.model import attention as attn_lib
from cas.model.sampler import ARGMAX_IMPLS, RNG_IMPLS, TOP_K_IMPLS, Sampler

F = flags.FLAGS
flags.DEFINE_string("model", "llama-3.2-1b", "PRESETS name or tiny")
flags.DEFINE_integer("batch", 64, "prompts per call")
flags.DEFINE_integer("prompt_len", 1024, "prompt tokens (a bucket size of the Sampler keeps padding at 0)")
flags.DEFINE_integer("new_tokens", 256, "generated tokens per prompt")
flags.DEFINE_integer("top_k", 20, "top-k log-probs per generated position")
flags.DEFINE_list("attn", ["reference"], f"cas attention implementations: {attn_lib.NAMES[:3]}")
flags.DEFINE_bool("torch", True, "also run transformers generate (subprocess, first)")
flags.DEFINE_string("torch_modes", "scores,processor", "torch top-k modes")
flags.DEFINE_integer("torch_timeout", 300, "seconds before the torch subprocess is killed")
flags.DEFINE_bool("smoke", False, "tiny model on CPU")
flags.DEFINE_string("out", None, "append JSON lines here")
flags.DEFINE_integer("seed", 0, "prompt seed")
flags.DEFINE_integer("shared_doc", 0, "tokens at the start of every cas prompt shared by all of them "
                     "(0: none); cas then runs generate_shared")
flags.DEFINE_list("shared_prefix", ["once"], "with --shared_doc: Sampler shared_prefix modes to run "
                  "(once, broadcast)")
flags.DEFINE_string("profile_dir", None, "also trace one more call of each cas variant with jax.profiler here and "
                    "add its device time by op to the record (\"ops\": benchmarks._common.summarize_trace): where a "
                    "decode step's time goes (issue 22: 1B decode at 16% of the bandwidth bound on an H100)")
flags.DEFINE_string("hlo_dir", None, "with --profile_dir: XLA writes every compiled program's optimized HLO here "
                    "and each profiled record's \"ops\" gets \"hlo\": what its top fusions compute (their HLO, "
                    "benchmarks._common.hlo_fusions), to tell which op a profile's fusion name is")
flags.DEFINE_list("top_k_impl", ["blocked"], "the Sampler's top-k of the log-probs per step: lax (jax.lax.top_k), "
                  "blocked (block maxima first; the same result); each one listed is its own variant")
flags.DEFINE_list("presplit", ["cache"], "Sampler presplit_layers (unrolled layers: each layer's weights sliced once "
                  "per call, before the decode loop): false, true, cache (true and split_cache: one KV array per "
                  "layer; the Sampler's default) or merged (cache, and each layer's q/k/v and gate/up weights joined "
                  "into one matrix each: Sampler merge_projections); each one listed is its own variant")
flags.DEFINE_list("prefix_kernel", ["cudnn"], "with --shared_doc: how a decode step attends the shared document: "
                  "cudnn (one fused cuDNN call for all rows, attention.fused_shared_prefix_attention; the default on "
                  "one CUDA device since 2026-12-07) or split (its f32 scores in memory, split_attention), set as "
                  "$CAS_SHARED_PREFIX_KERNEL for the variant; each one listed is its own variant")
flags.DEFINE_list("argmax", ["lax"], "the Sampler's token pick from the noised logits (argmax_impl): lax "
                  "(jnp.argmax), blocked (a plain max over blocks first; the same tokens); each one listed is its own "
                  "variant")
flags.DEFINE_list("rng", ["threefry2x32"], "the Sampler's PRNG of the draws (rng_impl): threefry2x32, rbg, "
                  "unsafe_rbg; each one listed is its own variant")
flags.DEFINE_list("layer_loop", ["scan"], "the model's layer loop in decode: scan (one while loop over the "
                  "layers per step, what the sampler runs today) and/or unrolled (one flat program per step, "
                  "which XLA's command buffers can capture as one CUDA graph: the launch-bound decode's lever)")


def main(argv):
  del argv
  if F.smoke:
    F.model, F.batch, F.prompt_len, F.new_tokens, F.top_k = "tiny", 4, 32, 16, 5
    if F["attn"].present == 0:
      F.attn = ["reference", "cudnn"]
    if F["shared_doc"].present:  # the tiny model's shared-document run: a 64-token document
      F.prompt_len, F.shared_doc = 72, 64
      if F["shared_prefix"].present == 0:
        F.shared_prefix = ["broadcast", "once"]
  user_xla_flags = os.environ.get("XLA_FLAGS", "")  # what the records name (not the dump flags below)
  if F.hlo_dir:  # before jax starts its backend, which reads XLA_FLAGS once; only the Sampler programs (jit(run))
    if not F.profile_dir:
      raise SystemExit("--hlo_dir names the fusions of a profile: give --profile_dir too")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + C.xla_dump_flags(F.hlo_dir, "jit_run")).strip()
  cfg = C.model_config(F.model)
  if not 0 <= F.shared_doc < F.prompt_len:
    raise SystemExit(f"--shared_doc={F.shared_doc} must be in [0, --prompt_len={F.prompt_len})")
  emit = C.Emitter(F.out, "synth_speed", {"model": F.model, "batch": F.batch, "prompt_len": F.prompt_len,
                                          "new_tokens": F.new_tokens, "shared_doc": F.shared_doc})
  torch_recs = []
  if F.torch:
    recs, rc, err = C.run_child(
        ["-m", "benchmarks.torch_baselines", "generate", f"--model={F.model}", f"--batch={F.batch}",
         f"--prompt_len={F.prompt_len}", f"--new_tokens={F.new_tokens}", f"--top_k={F.top_k}",
         f"--modes={F.torch_modes}", f"--seed={F.seed}"], timeout=F.torch_timeout)
    for r in recs:
      torch_recs.append(emit.emit({k: v for k, v in r.items() if k not in ("bench", "time", "host")}))
    if rc != 0 or not recs:
      emit.emit({"impl": "torch", "status": "error", "rc": rc, "stderr_tail": err[-1500:]})

  info = C.jax_device_info()
  emit.base.update({"device": info["device"], "jax": info["jax"]})
  t0 = time.perf_counter()
  model = C.init_random_model(cfg, dtype=jnp.bfloat16, seed=F.seed)
  jax.block_until_ready(model.embed[...])
  emit.emit({"impl": "cas", "event": "model_init", "init_s": time.perf_counter() - t0})
  rng = np.random.default_rng(F.seed)
  prompts = rng.integers(3, cfg.vocab_size, (F.batch, F.prompt_len)).tolist()  # same draw as the torch side
  modes = [None]
  if F.shared_doc:
    prompts = [prompts[0][:F.shared_doc] + p[F.shared_doc:] for p in prompts]  # one document for all
    modes = list(F.shared_prefix)

  cas_recs = []
  for name, choices in (("layer_loop", ("scan", "unrolled")), ("top_k_impl", TOP_K_IMPLS),
                        ("presplit", ("false", "true", "cache", "merged")), ("rng", RNG_IMPLS), ("argmax", ARGMAX_IMPLS),
                        ("prefix_kernel", ("split", "cudnn"))):
    bad = sorted(set(F[name].value) - set(choices))
    if bad:
      raise SystemExit(f"--{name}: {bad} unknown; choose from {', '.join(choices)}")
  for name, mode, loop, tk, ps_flag, rng, am, pk_impl in [
      (n, m, ll, t, s, r, a, k) for n in F.attn for m in modes for ll in F.layer_loop for t in F.top_k_impl
      for s in F.presplit for r in F.rng for a in F.argmax for k in (F.prefix_kernel if m else ["split"])]:
    # presplit and its per-layer cache act on unrolled layers only (a scan reads the stacked arrays)
    ps = ps_flag != "false" and loop == "unrolled"
    sc, mg = ps and ps_flag in ("cache", "merged"), ps and ps_flag == "merged"
    rec = {"impl": "cas", "variant": f"sampler/{name}" + (f"/shared_{mode}" if mode else "")
           + ("" if loop == "scan" else f"/{loop}") + ("" if tk == "blocked" else f"/topk_{tk}")
           + ("/presplit" if ps else "") + ("/split_cache" if sc else "") + ("/merged" if mg else "")
           + ("" if rng == "threefry2x32" else f"/rng_{rng}") + ("" if am == "lax" else f"/argmax_{am}")
           + ("" if pk_impl == "split" else f"/prefix_{pk_impl}"),
           "rng_impl": rng, "argmax_impl": am, "prefix_kernel": pk_impl,
           "attn": name, "shared_prefix": mode, "layer_loop": loop, "top_k_impl": tk,
           "presplit_layers": ps, "split_cache": sc, "merge_projections": mg,
           "xla_flags": user_xla_flags}
    prev = attn_lib.install(name)
    prev_kernel = os.environ.pop(attn_lib.SHARED_PREFIX_KERNEL_ENV, None)
    os.environ[attn_lib.SHARED_PREFIX_KERNEL_ENV] = pk_impl  # read at trace time: this variant's programs only
    rec["prefix_kernel_active"] = bool(mode) and attn_lib.shared_prefix_kernel_active(model.dtype)  # off CUDA: split
    model.layer_loop = loop  # a static attribute: the Sampler's graphdef (below) carries it into its programs
    try:
      sampler = Sampler(model, pad_id=0, cache_dtype=jnp.bfloat16, shared_prefix=mode, top_k_impl=tk,
                        presplit_layers=ps, split_cache=sc, merge_projections=mg, rng_impl=rng,
                        argmax_impl=am)
      call = sampler.generate_shared if mode else sampler.generate
      gen = lambda seed: call(prompts, max_new_tokens=F.new_tokens, temperature=1.0,
                              top_k_logprobs=F.top_k, seed=seed)
      t0 = time.perf_counter()
      gen(0)  # compile + first run
      rec["first_call_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      res = gen(1)
      dt = time.perf_counter() - t0
      n_gen = sum(len(g.tokens) for g in res)
      shapes = {g.top_logprobs.shape for g in res}
      if shapes != {(F.new_tokens, F.top_k)} or n_gen != F.batch * F.new_tokens:
        raise AssertionError(f"unexpected output: {n_gen} tokens, top-k shapes {shapes}")
      rec.update({"status": "ok", "time_s": dt, "generated_tokens": n_gen, "tokens_per_s": n_gen / dt,
                  "compilations": sampler.num_compilations, "memory": C.jax_memory()})
      if F.profile_dir:  # after the timing, which the trace must not slow
        d = os.path.join(F.profile_dir, rec["variant"].replace("/", "_"))
        os.makedirs(d, exist_ok=True)
        try:
          with jax.profiler.trace(d):
            gen(2)
          rec["ops"] = C.summarize_trace(d, top=20)
          if F.hlo_dir and "top" in rec["ops"]:
            rec["ops"]["hlo"] = C.hlo_fusions(F.hlo_dir, [n for n, _, _ in rec["ops"]["top"][:8]])
        except Exception as e:  # a failed trace must not lose the timing
          rec["ops"] = {"error": C.short_error(e)}
    except Exception as e:
      rec.update({"status": "oom" if C.is_oom(e) else "error", "error": C.short_error(e)})
      logging.exception("cas sampler with %s attention failed", name)
    finally:
      attn_lib.restore(prev)
      os.environ.pop(attn_lib.SHARED_PREFIX_KERNEL_ENV, None)
      if prev_kernel is not None:
        os.environ[attn_lib.SHARED_PREFIX_KERNEL_ENV] = prev_kernel
    cas_recs.append(emit.emit(rec))

  for r in cas_recs:
    if r.get("status") != "ok":
      continue
    for t in torch_recs:
      if t.get("status") == "ok":
        emit.emit({"comparison": "cas_vs_torch", "cas_variant": r["variant"], "torch_variant": t["variant"],
                   "cas_tokens_per_s": r["tokens_per_s"], "torch_tokens_per_s": t["tokens_per_s"],
                   "speedup": r["tokens_per_s"] / t["tokens_per_s"], "target_speedup": 3.0})
  if F.smoke and ([r for r in cas_recs if r.get("status") != "ok"]
                  or (F.torch and not [t for t in torch_recs if t.get("status") == "ok"])):
    raise SystemExit("smoke: a variant failed")


if __name__ == "__main__":
  app.run(main)
