"""Cartridges on one document of the built-in collection: self-study -> distillation -> eval.

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
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "quickstart"
  c = ml_collections.ConfigDict()
  c.model_path = ml_collections.FieldReference(None, field_type=str)  # None = default cached model
  c.dtype = "float32"  # float32 | bfloat16 (compute and frozen weights; cartridges are fp32 masters)
  c.remat = "none"  # none | full | dots: recompute layer activations in the backward pass
  c.layer_loop = "auto"  # auto | scan | unrolled: auto unrolls training forwards on a GPU (faster)
  # prompts of self-study and evaluation: "chat" (the chat template), "completion" (a base model:
  # "{document}\n\nQuestion: {q}\nAnswer:", answers one line) or "auto" (chat when the model's files
  # carry a chat template, else completion: the Gemma 3 270M base GGUF; cas.model.tokenizer)
  c.prompt_format = "auto"

  c.data = ml_collections.ConfigDict()
  c.data.path = ml_collections.FieldReference(None, field_type=str)  # a saved collection dir; None = built-in
  c.data.kind = "patients"  # patients | products | minutes | prose (built-in) | longhealth | quality | qasper | folder
  c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)  # benchmark / folder files
  c.data.split = ml_collections.FieldReference(None, field_type=str)  # benchmark split; None = the only one
  c.data.num_docs = 1
  c.data.seed = 0
  c.data.doc_index = 0
  c.data.words_per_doc = ml_collections.FieldReference(None, field_type=int)
  # Built-in patients | products | minutes only (issue 21): how questions name their document, a
  # comma-separated subset of "title,content"; None = the kind's default (today's questions)
  c.data.question_refs = ml_collections.FieldReference(None, field_type=str)
  # the share of two-document questions in the collection (0 = none); this pipeline trains one
  # document's cartridge and evaluates its single-document questions
  c.data.pair_share = 0.0

  c.synth = ml_collections.ConfigDict()
  c.synth.conversations = 96  # per document
  c.synth.shard_size = 32
  c.synth.batch_size = 32
  # the teacher sees up to 2,048 tokens of the document (the whole quickstart document):
  # 128-384-token chunks gave 39.3-42.9 here, the whole document 46.4 (README)
  c.synth.min_chunk = 1024
  c.synth.max_chunk = 2048
  c.synth.max_user_tokens = 64
  c.synth.max_answer_tokens = 128
  c.synth.temperature_a = 0.7
  c.synth.temperature_b = 0.0
  c.synth.top_k = 20
  c.synth.seed = 0
  # seed-prompt families; a name may repeat to weight it. The paper's five, plus "quote"
  # (templated: a passage of the chunk in the user message; cas.synth.selfstudy). The 135M
  # default model writes poor user messages from the paper's five (cartridge 46.4 at p = 256
  # vs 57.1 with "quote" alone: README), so the quickstart uses "quote"; the paper preset the five.
  c.synth.families = ("quote",)
  # "random" chunks/passages, or "walk": every sentence of a document in turn (cas.synth.selfstudy)
  c.synth.coverage = "random"

  c.cartridge = ml_collections.ConfigDict()
  c.cartridge.num_tokens = 512  # p, sink included (p = 256 gave 53.6 vs 67.9 here: README)
  c.cartridge.num_frozen = 1
  c.cartridge.init = "first_tokens"  # first_tokens | random_chunk | random_vectors
  # a document shorter than p: "pad" (its tokens, then short_fill: "repeat" the document | "random_vectors")
  # or "error" (refused before any work starts)
  c.cartridge.short_documents = "pad"
  c.cartridge.short_fill = "repeat"

  c.train = ml_collections.ConfigDict()
  c.train.steps = 64  # 96 gave no better cartridge here (67.9 / 64.3 vs 67.9 / 67.9 / 75.0 over seeds)
  c.train.batch_size = 4
  c.train.seq_len = 256
  c.train.lr = 2e-2  # the reference's learning rate
  c.train.warmup_steps = 4
  c.train.clip_norm = 1.0
  c.train.loss = "distill"  # distill | next_token (ablation)
  c.train.loss_chunk = 4096  # tokens per chunk of the fused LM head + loss; 0 = full [B, T, V] logits
  c.train.seed = 0
  c.train.log_every = 8
  c.train.ckpt_every = 16
  c.train.keep_checkpoints = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.methods = ("no_context", "icl", "cartridge")
  c.eval.max_questions = 0  # 0 = all questions of the document
  c.eval.max_new_tokens = 24

  if arg == "quickstart":
    pass
  elif arg == "paper":
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
    c.eval.max_questions = 3
  else:
    raise ValueError(f"configs/cartridge.py: unknown preset {arg!r} (known: quickstart, paper, tiny)")
  return c
