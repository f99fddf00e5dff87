"""Cartridges on one document of the built-in collection: self-study -> distillation -> eval.

The one pipeline (cas/pipeline.py, the same as configs/cas.py) on one document (`data.doc_index`):
one device slot, k_max = 1, no rotation, each training row packed with as many of the document's
conversations as fit (`train.pack`), evaluated with no_context, icl and cartridge_oracle. The
cartridge is in <workdir>/cas/store and exported on its own to <workdir>/cas/cartridge.

The README's first command runs the `quickstart` preset on CPU with the default model
(SmolLM2-135M-Instruct, fetched by `python -m launch.fetch_model`):

  python -m launch.pipeline --config=configs/cartridge.py:quickstart --workdir=runs/quickstart

Stages one at a time (each resumes if killed; same --workdir):

  python -m launch.synthesize --config=configs/cartridge.py:quickstart --workdir=runs/quickstart
  python -m launch.train      --config=configs/cartridge.py:quickstart --workdir=runs/quickstart
  python -m launch.evaluate   --config=configs/cartridge.py:quickstart --workdir=runs/quickstart

Paper scale on one GPU (p in {128, 512, 2048}; thousands of conversations):

  python -m launch.pipeline --config=configs/cartridge.py:paper --config.cartridge.num_tokens=512 \
      --workdir=runs/paper_p512

Presets (`arg`): quickstart (default), paper, tiny (seconds; for smoke tests).

Every field of configs/cas.py applies and is documented there, e.g. the init: `cartridge.init`
(first_tokens | key_norm | random_chunk | random_vectors), `cartridge.init_text=salient` (a document longer
than p starts from its most salient sentences instead of its first p tokens), `cartridge.init_header`,
`cartridge.short_documents` / `short_fill` (a document shorter than p).
"""
import ml_collections

from configs import cas as cas_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "quickstart"
  if arg not in ("quickstart", "paper", "tiny"):
    raise ValueError(f"configs/cartridge.py: unknown preset {arg!r} (known: quickstart, paper, tiny)")
  c = cas_config.get_config("quick")  # every field of the pipeline, then the one-document settings
  c.data.num_docs = 1
  c.data.doc_index = 0  # the document of the collection this run trains (None: the first num_docs)

  c.synth.conversations = 96  # per document
  c.synth.shard_size = 32
  c.synth.batch_size = 32
  # the teacher sees up to 2,048 tokens of the document (the whole quickstart document):
  # 128-384-token chunks gave 39.3-42.9 here, the whole document 46.4 (README)
  c.synth.min_chunk = 1024
  c.synth.max_chunk = 2048
  c.synth.max_user_tokens = 64
  c.synth.max_answer_tokens = 128
  # The 135M default model writes poor user messages from the paper's five seed-prompt families
  # (cartridge 46.4 at p = 256 vs 57.1 with "quote" alone: README), so the quickstart uses "quote";
  # the paper preset the five.
  c.synth.families = ("quote",)

  c.cartridge.num_tokens = 512  # p, sink included (p = 256 gave 53.6 vs 67.9 here: README)

  c.train.steps = 64  # 96 gave no better cartridge here (67.9 / 64.3 vs 67.9 / 67.9 / 75.0 over seeds)
  c.train.batch_size = 4
  c.train.seq_len = 256
  c.train.lr = 2e-2  # the reference's learning rate
  c.train.warmup_steps = 4
  c.train.log_every = 8
  c.train.ckpt_every = 16
  # one cartridge: one slot, no distractors, no rotation; rows packed with the document's conversations
  c.train.num_slots = 1
  c.train.k_max = 1
  c.train.p_isolated = 1.0
  c.train.pack = True

  c.eval.methods = ("no_context", "icl", "cartridge_oracle")
  c.eval.max_questions_per_doc = 0  # 0 = every question of the document
  c.eval.num_loaded = (1,)
  c.eval.position_modes = ("shared",)

  if arg == "paper":
    c.dtype = "bfloat16"
    c.remat = "none"  # fits on one 80 GB GPU with the fused LM head + loss; 10% faster than full
    c.data.words_per_doc = 4000  # ~5.5k tokens: ICL still fits SmolLM2's 8k context
    c.synth.conversations = 2048
    c.synth.shard_size = 256
    c.synth.batch_size = 256  # cuDNN prefill; decode-bound (batch 64: 194 s, 256: 158 s on an H100)
    c.synth.min_chunk, c.synth.max_chunk = 512, 2048
    c.synth.families = ("structuring", "summarization", "question", "use_case", "creative")
    c.synth.max_user_tokens, c.synth.max_answer_tokens = 128, 512
    c.cartridge.num_tokens = 512
    c.train.steps = 2000
    c.train.batch_size = 8
    c.train.seq_len = 2048
    c.train.log_every = 50
    c.train.ckpt_every = 250
  elif arg == "tiny":
    c.synth.conversations = 4
    c.synth.shard_size = 2
    c.synth.batch_size = 2
    c.synth.max_user_tokens, c.synth.max_answer_tokens = 8, 16
    c.synth.min_chunk, c.synth.max_chunk = 128, 384
    c.synth.families = ("question", "quote")  # both kinds of user message (bot A, templated)
    c.cartridge.num_tokens = 16
    c.train.steps = 4
    c.train.batch_size = 1
    c.train.ckpt_every = 2
    c.eval.max_questions_per_doc = 3
  return c
