"""PyTorch (transformers) baselines for the issue-7 benchmarks, run as a subprocess.

The JAX scripts start this *before* they touch the GPU, so both sides get the whole card in the
same run (same card, same process tree). It never imports jax. Each measurement is printed as one
JSON line on stdout (the parent collects and re-emits them); logs go to stderr.

  python -m benchmarks.torch_baselines train --model=llama-3.2-1b --batch=8 --p=2048 --seq=2048
  python -m benchmarks.torch_baselines generate --model=llama-3.2-1b --batch=64 --prompt_len=1024 --new_tokens=256

`train`: the cartridge distillation step done the PyTorch way. A `LlamaForCausalLM` built from a
`LlamaConfig` with the same shapes, random bf16 weights, `requires_grad_(False)`; the cartridge
is one fp32 master [1, Hkv, p, D] per layer for keys and values (the first token frozen, as in
cas: num_frozen = 1), cast to bf16 and expanded over the batch every step; the same packed batch
as the cas step (`benchmarks._common.make_packed_batch`): segment-causal 4D mask over
[prefix ; self] ([B, 1, T, p+T], additive bf16), positions restarting at p per segment, loss =
cross-entropy against the stored top-20 teacher distribution on answer tokens (as
`cas.train.loss.distill_loss`), Adam (fused where available) on the prefix only with global-norm
clipping 1.0. Prefix injection (`--prefix`):
  * cache: a fresh `transformers.DynamicCache` per step holding the prefix of every layer, passed
    as the model's cache (the usual way: what prefix tuning and PEFT do);
  * hook: a registered attention function (`AttentionInterface`) that prepends the prefix to the
    keys/values and calls transformers' SDPA attention. Stateless, so it also works with
    gradient checkpointing (`--remat=full`), which drops the cache argument in transformers.
  * peft: PEFT's CARTRIDGE adapter (`peft.CartridgeConfig`) if installed. PEFT concatenates a 2D
    padding mask and ignores position_ids, so this variant runs one causal sequence per row (no
    packed segments, positions p..p+T-1): the same FLOPs shape, not the same masks. Labelled.
`--remat=auto` tries without gradient checkpointing and falls back to checkpointing (hook
prefix) on out-of-memory. `--compile` wraps the model in `torch.compile` (hook prefix).

`generate`: `model.generate(do_sample=True, output_scores=True, return_dict_in_generate=True)`
with top-20 log-probs of every generated position taken from the scores afterwards
("scores"), and the same with a `LogitsProcessor` that records the top-20 per step instead of
keeping all scores ("processor"), optionally with a static cache ("static"; transformers may torch.compile the
decoding step itself on CUDA: warm-up at full length). EOS disabled (eos_token_id=None) so every row generates
exactly `new_tokens`.

`--parity_out=FILE.npz` (smoke tests): saves the model's weights, the prefix and the loss of the
first step before any update, so the JAX side can check it computes the same loss.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import os
import sys
import time

import numpy as np
import torch

from benchmarks._common import (Emitter, is_oom, make_packed_batch, model_config, short_error,
                                time_steps, train_flops)


def log(msg: str) -> None:
  print(f"[torch] {msg}", file=sys.stderr, flush=True)


def device_info() -> dict:
  import transformers
  if torch.cuda.is_available():
    name = torch.cuda.get_device_name()
  else:
    name = "cpu"
  from benchmarks._common import peak_bf16_flops
  return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
          "peak_bf16_flops": peak_bf16_flops(name)}


def sync(_=None) -> None:
  if torch.cuda.is_available():
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------- model

def hf_config(cfg, attn: str):
  """A transformers `LlamaConfig` with the shapes of a cas `ModelConfig` (transformers 4.4x or 5.x)."""
  from transformers import LlamaConfig
  kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=cfg.tie_word_embeddings,
            max_position_embeddings=cfg.max_position_embeddings, attention_bias=False, mlp_bias=False,
            pad_token_id=0, bos_token_id=None, eos_token_id=None)
  scaling = cfg.rope_scaling_dict
  fields = getattr(LlamaConfig, "__dataclass_fields__", {})
  if "rope_parameters" in fields or "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if scaling:
      rope = {**scaling, "rope_theta": cfg.rope_theta}
    hc = LlamaConfig(**kw, rope_parameters=rope)
  else:  # transformers 4.x
    hc = LlamaConfig(**kw, rope_theta=cfg.rope_theta, rope_scaling=scaling)
  try:
    hc._attn_implementation = attn
  except Exception:  # read-only on some versions; set on the model below
    pass
  return hc


def set_attn(model, attn: str) -> None:
  if hasattr(model, "set_attn_implementation"):
    try:
      model.set_attn_implementation(attn)
    except Exception as e:  # a registered custom name may be refused by older checks
      log(f"set_attn_implementation({attn!r}) failed ({short_error(e, 200)}); setting the config field")
      model.config._attn_implementation = attn
  else:
    model.config._attn_implementation = attn
  if getattr(model.config, "_attn_implementation", attn) != attn:
    raise RuntimeError(f"could not select attention {attn!r} (config says "
                       f"{model.config._attn_implementation!r})")


def build_model(cfg, *, attn: str, device: str, dtype=torch.bfloat16, seed: int = 0, std: float = 0.02):
  """Random-weight LlamaForCausalLM on `device` in `dtype`, frozen (weights N(0, std), norms 1)."""
  from transformers import LlamaForCausalLM
  hc = hf_config(cfg, attn)
  prev = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    with torch.device(device):
      model = LlamaForCausalLM(hc)
  finally:
    torch.set_default_dtype(prev)
  set_attn(model, attn)
  gen = torch.Generator(device=device).manual_seed(seed)
  with torch.no_grad():
    for name, prm in model.named_parameters():
      if "norm" in name:
        prm.fill_(1.0)
      else:
        prm.normal_(0.0, std, generator=gen)
  model.requires_grad_(False)
  return model


def _cache_kwarg(model) -> str:
  """Name of the cache argument of the model's forward ('cache' in transformers >= 5.2x)."""
  params = inspect.signature(model.model.forward).parameters
  return "cache" if "cache" in params else "past_key_values"


def make_prefix_cache(keys, values, hc):
  """A DynamicCache holding per-layer prefix keys/values [B, Hkv, P, D] (transformers 4.4x/5.x)."""
  from transformers import DynamicCache
  try:
    cache = DynamicCache(config=hc)
  except TypeError:
    cache = DynamicCache()
  for i, (k, v) in enumerate(zip(keys, values)):
    cache.update(k, v, i)
  return cache


_HOOK_NAME = "cas_prefix_sdpa"


def register_prefix_attention() -> None:
  """Register `cas_prefix_sdpa`: SDPA attention over [prefix ; keys], prefix from kwargs."""
  from transformers import AttentionInterface
  from transformers.integrations.sdpa_attention import sdpa_attention_forward

  def prefix_sdpa(module, query, key, value, attention_mask, **kwargs):
    pk, pv = kwargs.pop("cas_prefix_k", None), kwargs.pop("cas_prefix_v", None)
    if pk is None:
      raise RuntimeError("cas_prefix_sdpa: this transformers version did not pass the cas_prefix_k/"
                         "cas_prefix_v forward kwargs down to attention; use --prefix=cache")
    i = module.layer_idx
    key = torch.cat([pk[i], key], dim=2)
    value = torch.cat([pv[i], value], dim=2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

  AttentionInterface.register(_HOOK_NAME, prefix_sdpa)


def segment_mask(segment_ids: torch.Tensor, p: int, dtype) -> torch.Tensor:
  """segment_ids [B, T] int -> additive mask [B, 1, T, p+T] (0 visible, dtype-min masked):
  every query sees the whole prefix; self keys: earlier-or-same slot of the same non-zero segment."""
  b, t = segment_ids.shape
  ar = torch.arange(t, device=segment_ids.device)
  causal = ar[None, :] <= ar[:, None]  # [T, T]
  same = (segment_ids[:, None, :] == segment_ids[:, :, None]) & (segment_ids[:, None, :] != 0)
  vis = torch.cat([torch.ones(b, t, p, dtype=torch.bool, device=segment_ids.device), causal[None] & same], -1)
  mask = torch.zeros(b, 1, t, p + t, dtype=dtype, device=segment_ids.device)
  return mask.masked_fill_(~vis[:, None], torch.finfo(dtype).min)


def _distill_sum(logits, topk_ids, topk_lp, loss_mask):
  """Sum over masked tokens of the cross-entropy against the teacher's top-k (float32)."""
  logits = logits.float()
  lse = torch.logsumexp(logits, dim=-1, keepdim=True)
  student = torch.gather(logits, -1, topk_ids) - lse
  per_tok = -(torch.exp(topk_lp) * student).sum(-1)
  return (per_tok * loss_mask).sum()


def distill_loss(logits, topk_ids, topk_lp, loss_mask):
  """As cas.train.loss.distill_loss: logits [B, T, V] (any float), topk [B, T, K], mask [B, T]."""
  return _distill_sum(logits, topk_ids, topk_lp, loss_mask) / loss_mask.sum().clamp_min(1.0)


def _chunk_loss(hc, w, ids, lp, m):
  return _distill_sum(hc @ w.t(), ids, lp, m)  # logits [B, C, V] of this chunk only


def chunked_distill_loss(h, w, topk_ids, topk_lp, loss_mask, chunk_tokens: int = 4096):
  """`distill_loss` from final hidden states h [B, T, E] and the LM head w [V, E], over chunks of
  about `chunk_tokens` tokens, each under activation checkpointing: no [B, T, V] logits are kept
  (the backward recomputes one chunk's logits at a time). The usual PyTorch memory fix."""
  from torch.utils.checkpoint import checkpoint
  b, t = loss_mask.shape
  c = max(1, chunk_tokens // b)
  total = h.new_zeros((), dtype=torch.float32)
  for t0 in range(0, t, c):
    sl = slice(t0, t0 + c)
    total = total + checkpoint(_chunk_loss, h[:, sl], w, topk_ids[:, sl], topk_lp[:, sl], loss_mask[:, sl],
                               use_reentrant=False)
  return total / loss_mask.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------- train

class PrefixKV(torch.nn.Module):
  """fp32 cartridge masters: sink [L, 1, Hkv, 1, D] (frozen) + trainable [L, 1, Hkv, p-1, D]."""

  def __init__(self, cfg, p: int, device: str, seed: int):
    super().__init__()
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    shape = (cfg.num_layers, 1, cfg.num_kv_heads, p - 1, cfg.head_dim)
    sshape = (cfg.num_layers, 1, cfg.num_kv_heads, 1, cfg.head_dim)
    self.k = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.5).to(device))
    self.v = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.5).to(device))
    self.register_buffer("sink_k", (torch.randn(sshape, generator=g) * 0.5).to(device))
    self.register_buffer("sink_v", (torch.randn(sshape, generator=g) * 0.5).to(device))

  def layers(self, batch: int, dtype):
    """Per-layer [B, Hkv, p, D] in `dtype` (expanded views over the batch)."""
    k = torch.cat([self.sink_k, self.k], dim=3).to(dtype)  # [L, 1, Hkv, p, D]
    v = torch.cat([self.sink_v, self.v], dim=3).to(dtype)
    return ([k[i].expand(batch, -1, -1, -1) for i in range(k.shape[0])],
            [v[i].expand(batch, -1, -1, -1) for i in range(v.shape[0])])


def train_variant(cfg, args, device, mode: str, remat: str, compile_: bool, emit: Emitter, base: dict,
                  loss_form: str = "full"):
  """Build the model, time the step for one (prefix mode, remat, compile, loss form) setting, emit
  a record. loss_form: full ([B, T, V] logits from the model) or chunked (`chunked_distill_loss`)."""
  dtype = getattr(torch, args.dtype)
  attn = _HOOK_NAME if mode == "hook" else "sdpa"
  if mode == "hook":
    register_prefix_attention()
  t0 = time.perf_counter()
  model = build_model(cfg, attn=attn, device=device, dtype=dtype, seed=args.seed, std=args.init_std)
  build_s = time.perf_counter() - t0
  if remat == "full":
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  model.train()  # dropout is 0; train mode is what gradient checkpointing needs
  prefix = PrefixKV(cfg, args.p, device, args.seed)
  fused = {"fused": True} if device == "cuda" else {"foreach": True}
  opt = torch.optim.Adam(prefix.parameters(), lr=2e-2, **fused)

  nb = make_packed_batch(cfg.vocab_size, args.batch, args.seq, args.p, args.segments, args.top_k, args.seed)
  tb = {k: torch.from_numpy(v).to(device) for k, v in nb.items()}
  tb["tokens"], tb["positions"], tb["topk_ids"] = (tb["tokens"].long(), tb["positions"].long(),
                                                   tb["topk_ids"].long())
  b, t = nb["tokens"].shape
  if mode == "peft":
    mask = None  # PEFT: one causal sequence per row (see module doc)
  else:
    mask = segment_mask(tb["segment_ids"], args.p, dtype)
  cache_kw = _cache_kwarg(model)

  if mode == "peft":
    from peft import CartridgeConfig, get_peft_model
    pc = CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.p, num_frozen_tokens=1)
    runner = get_peft_model(model, pc)
    runner.to(device)
    params = [q for q in runner.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-2, **fused)
    log(f"peft: {sum(q.numel() for q in params)} trainable parameters "
        f"({[str(q.dtype) for q in params][:2]})")
  else:
    runner = torch.compile(model) if compile_ else model
    params = list(prefix.parameters())

  def forward_loss():
    if mode == "peft":
      out = runner(input_ids=tb["tokens"], attention_mask=torch.ones(b, t, dtype=torch.long, device=device))
    else:
      pk, pv = prefix.layers(b, dtype)
      kw = {}
      if mode == "cache":
        kw[cache_kw] = make_prefix_cache(pk, pv, model.config)
        kw["use_cache"] = True
      else:
        kw["cas_prefix_k"], kw["cas_prefix_v"] = pk, pv
        kw["use_cache"] = False
      if loss_form == "chunked":
        base_model = runner.model if hasattr(runner, "model") else runner._orig_mod.model
        hid = base_model(input_ids=tb["tokens"], position_ids=tb["positions"], attention_mask=mask, **kw)
        return chunked_distill_loss(hid.last_hidden_state, model.lm_head.weight, tb["topk_ids"],
                                    tb["topk_logprobs"], tb["loss_mask"])
      out = runner(input_ids=tb["tokens"], position_ids=tb["positions"], attention_mask=mask, **kw)
    return distill_loss(out.logits, tb["topk_ids"], tb["topk_logprobs"], tb["loss_mask"])

  def step():
    loss = forward_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  if args.parity_out and mode != "peft" and not os.path.exists(args.parity_out):
    with torch.no_grad():
      loss0 = float(forward_loss())
    sd = {k: v.float().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(args.parity_out, loss=loss0,
             prefix_k=torch.cat([prefix.sink_k, prefix.k], 3).detach().cpu().numpy(),
             prefix_v=torch.cat([prefix.sink_v, prefix.v], 3).detach().cpu().numpy(),
             **{"w/" + k: v for k, v in sd.items()})
    log(f"parity: first-step loss {loss0:.6f} and weights saved to {args.parity_out}")

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  tm = time_steps(step, lambda out: (float(out.detach()), sync()), warmup=args.warmup, steps=args.steps)
  loss = float(step().detach())
  fl = train_flops(cfg, nb["segment_ids"], args.p)
  peak = base.get("peak_bf16_flops")
  rec = {"impl": "torch", "variant": f"{mode}{'+compile' if compile_ else ''}{'+chunked' if loss_form == 'chunked' else ''}",
         "prefix_mode": mode, "loss_form": loss_form,
         "dtype": args.dtype,
         "attn": "sdpa", "remat": remat, "compile": compile_, "batch": b, "seq": t, "p": args.p,
         "status": "ok", "build_s": round(build_s, 2), "first_step_s": tm["first_call_s"],
         "step_s": tm["step_s"], "tokens_per_step": fl["tokens"],
         "tokens_per_s": fl["tokens"] / tm["step_s"], "loss": loss,
         "mfu_4n": fl["flops_4n"] / tm["step_s"] / peak if peak else None,
         "mfu_6n": fl["flops_6n"] / tm["step_s"] / peak if peak else None,
         "tflops_4n": fl["flops_4n"] / tm["step_s"] / 1e12,
         "peak_mem_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}
  if mode == "peft":
    rec["note"] = "PEFT CARTRIDGE: one causal sequence per row (no packed segments), positions p.."
  emit.emit(rec)
  return rec


def cmd_train(args) -> int:
  cfg = model_config(args.model)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  base = {**device_info(), "model": args.model}
  emit = Emitter(None, "train_step", base)
  modes = [m for m in args.prefix.split(",") if m]
  for mode in modes:
    if mode == "peft":
      try:
        import peft  # noqa: F401
        from peft import CartridgeConfig  # noqa: F401
      except Exception as e:
        emit.emit({"impl": "torch", "variant": "peft", "status": "skipped",
                   "reason": f"peft CARTRIDGE unavailable: {short_error(e, 200)}"})
        continue
    remats = ["none", "full"] if args.remat == "auto" else [args.remat]
    if mode == "peft":
      remats = ["none"]  # PEFT feeds a cache, which gradient checkpointing would drop
    for loss_form in [x for x in args.loss.split(",") if x]:
      if mode == "peft" and loss_form != "full":
        continue  # PEFT runs the whole wrapped model
      for remat in remats:
        m = "hook" if (remat == "full" and mode == "cache") else mode
        oom = False
        try:
          train_variant(cfg, args, device, m, remat, args.compile and m == "hook", emit, base, loss_form)
          break
        except Exception as e:  # OOM: try the next remat setting; anything else: report, go on
          oom = is_oom(e)
          emit.emit({"impl": "torch", "variant": m + ("+chunked" if loss_form == "chunked" else ""),
                     "remat": remat, "batch": args.batch, "loss_form": loss_form,
                     "status": "oom" if oom else "error", "error": short_error(e)})
          log(f"{m}/{remat}/{loss_form}: {short_error(e, 2000)}")
        # Outside the except block: the exception (and the frames holding the model) is gone.
        gc.collect()
        if device == "cuda":
          torch.cuda.empty_cache()
        if not oom:
          break
  return 0


# ----------------------------------------------------------------------------- generate

def cmd_generate(args) -> int:
  from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
  cfg = model_config(args.model)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  base = {**device_info(), "model": args.model}
  emit = Emitter(None, "synth_speed", base)
  t0 = time.perf_counter()
  model = build_model(cfg, attn=args.attn, device=device, seed=args.seed).eval()
  build_s = time.perf_counter() - t0
  rng = np.random.default_rng(args.seed)
  prompts = torch.from_numpy(rng.integers(3, cfg.vocab_size, (args.batch, args.prompt_len))).long().to(device)
  am = torch.ones_like(prompts)
  k = args.top_k

  class TopK(LogitsProcessor):
    """Records log_softmax top-k of each step's scores; returns the scores unchanged."""

    def __init__(self):
      self.ids, self.lps = [], []

    def __call__(self, input_ids, scores):
      lp, ids = torch.log_softmax(scores.float(), dim=-1).topk(k, dim=-1)
      self.ids.append(ids)
      self.lps.append(lp)
      return scores

  def gen_config(n: int, scores: bool, static: bool = False) -> GenerationConfig:
    kw = {"cache_implementation": "static"} if static else {}
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0,
                            top_k=None, top_p=None, output_scores=scores, return_dict_in_generate=True,
                            pad_token_id=0, eos_token_id=None, bos_token_id=None, use_cache=True, **kw)

  def run(mode: str, n: int):
    with torch.inference_mode():
      if mode == "scores":
        out = model.generate(prompts, attention_mask=am, generation_config=gen_config(n, True))
        top = [torch.log_softmax(s.float(), -1).topk(k, -1) for s in out.scores]  # n x ([B, k], [B, k])
        lp = torch.stack([x.values for x in top], 1)  # [B, n, k]
        ids = torch.stack([x.indices for x in top], 1)
      else:  # "processor", or "static": the same with a static cache (transformers may then
        rec = TopK()  # torch.compile the decoding step on its own, on CUDA)
        out = model.generate(prompts, attention_mask=am, generation_config=gen_config(n, False, mode == "static"),
                             logits_processor=LogitsProcessorList([rec]))
        lp, ids = torch.stack(rec.lps, 1), torch.stack(rec.ids, 1)
      toks = out.sequences[:, args.prompt_len:]
      res = (toks.cpu().numpy(), lp.cpu().numpy(), ids.cpu().numpy())
    sync()
    return res

  for mode in args.modes.split(","):
    try:
      t0 = time.perf_counter()
      # warm-up at full length: kernels, and the caching allocator's blocks for the cache as it grows to the
      # full length (a static cache is sized by it). An 8-token warm-up left the timed call paying for the
      # allocator: 2026-12-06, processor mode run first at batch 64 read 736 tokens/s against 4,318 when
      # the scores mode (a full-length call) had run before it.
      run(mode, args.new_tokens)
      warm_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      toks, lp, ids = run(mode, args.new_tokens)
      dt = time.perf_counter() - t0
      n_gen = int(toks.shape[0] * toks.shape[1])
      assert lp.shape == (args.batch, args.new_tokens, k), lp.shape
      emit.emit({"impl": "torch", "variant": f"generate/{mode}", "attn": args.attn, "status": "ok",
                 "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                 "top_k": k, "build_s": round(build_s, 2), "warmup_s": warm_s, "time_s": dt,
                 "generated_tokens": n_gen, "tokens_per_s": n_gen / dt,
                 "peak_mem_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None})
    except Exception as e:
      emit.emit({"impl": "torch", "variant": f"generate/{mode}", "status": "oom" if is_oom(e) else "error",
                 "batch": args.batch, "error": short_error(e)})
      if device == "cuda":
        torch.cuda.empty_cache()
  return 0


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  tr = sub.add_parser("train")
  tr.add_argument("--model", default="llama-3.2-1b")
  tr.add_argument("--batch", type=int, default=8)
  tr.add_argument("--p", type=int, default=2048)
  tr.add_argument("--seq", type=int, default=2048)
  tr.add_argument("--segments", type=int, default=4)
  tr.add_argument("--top_k", type=int, default=20)
  tr.add_argument("--steps", type=int, default=10)
  tr.add_argument("--warmup", type=int, default=3)
  tr.add_argument("--prefix", default="cache", help="comma list of cache, hook, peft")
  tr.add_argument("--remat", default="auto", choices=["auto", "none", "full"])
  tr.add_argument("--compile", action="store_true", help="torch.compile the model (hook prefix only)")
  tr.add_argument("--loss", default="full", help="comma list of full (logits from the model) and chunked "
                  "(hidden states + chunked, checkpointed LM head and loss: no [B, T, V] logits kept)")
  tr.add_argument("--seed", type=int, default=0)
  tr.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  tr.add_argument("--init_std", type=float, default=0.02, help="weight init std (parity checks use a large one)")
  tr.add_argument("--parity_out", default=None)
  ge = sub.add_parser("generate")
  ge.add_argument("--model", default="llama-3.2-1b")
  ge.add_argument("--batch", type=int, default=64)
  ge.add_argument("--prompt_len", type=int, default=1024)
  ge.add_argument("--new_tokens", type=int, default=256)
  ge.add_argument("--top_k", type=int, default=20)
  ge.add_argument("--attn", default="sdpa")
  ge.add_argument("--modes", default="scores,processor", help="comma list of scores, processor, static")
  ge.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  torch.manual_seed(args.seed)
  if not torch.cuda.is_available():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  return cmd_train(args) if args.cmd == "train" else cmd_generate(args)


if __name__ == "__main__":
  sys.exit(main())
