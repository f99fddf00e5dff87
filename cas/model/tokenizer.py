"""Tokenizer and chat template, built from the model's own files.

    tok = Tokenizer.from_path("model.gguf")        # or a Hugging Face model directory
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    text = tok.decode(ids)

Nothing is hard-coded: BOS/EOS/PAD ids and the chat template come from the files.
`eos_ids` holds every id that ends a generation: the tokenizer's EOS, the ids listed in
`generation_config.json` (HF directories) or `tokenizer.ggml.eot_token_id`/`eom_token_id`
(GGUF), and the chat template's end-of-turn token when it is a special token (ChatML's
`<|im_end|>`, Llama 3's `<|eot_id|>`).

GGUF byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama 3, Qwen2/3)
are rebuilt here with the `tokenizers` library, splitting text the way llama.cpp does for the
file's `tokenizer.ggml.pre`. (transformers' own GGUF tokenizer path needs torch, and splits
`smollm` vocabularies differently from llama.cpp.) Other GGUF vocabularies go through
`transformers.AutoTokenizer(..., gguf_file=...)`, which needs torch installed (Gemma 3's
SentencePiece vocabulary, `tokenizer.ggml.model == "llama"`, goes this way).

A Gemma GGUF without `tokenizer.chat_template` (llama.cpp's converter of the *base* models writes
none) gets `GEMMA_CHAT_TEMPLATE`, the turn format of Google's Gemma 3 tokenizer_config.json
(`<start_of_turn>user ... <end_of_turn>`, a system message prepended to the first user turn),
when the vocabulary has its turn tokens; `<end_of_turn>` then ends generations.

Prompt formats (`Tokenizer.prompt_format`; the pipelines' `config.prompt_format`):
  chat        the chat template (instruction-tuned models; the default of a bare Tokenizer).
  bare        the chat template, but a conversation without a system message gets none: SmolLM2's
              template would insert its default turn ("You are a helpful AI assistant named
              SmolLM...") between a cartridge and the question (RESULTS.md "The window and what
              follows the cartridge"). Conversations with a system message render as in chat.
              Only for templates that render the system message as its own turn (not Gemma's).
  completion  plain text for a *base* model, which does not follow chat turns (Gemma 3 270M
              copies the start of the user turn): a system message gives the document alone,
              a user message is a question line, the answer is one line:
                  [BOS] {document}\n\nQuestion: {question}\nAnswer: {answer}\n
              (BOS when the tokenizer adds it to encoded text, as Gemma's and Llama 3's do).
              The answer is the first non-empty line of what the model writes (`answer_length`:
              up to the first newline token after text; leading line breaks do not end it);
              an answer starts with a space (`answer_prefix`).
  auto        chat when the model's own files carry a chat template (an HF directory's
              tokenizer_config.json / chat_template.jinja, a GGUF's tokenizer.chat_template: the
              instruction models), completion when they carry none (the Gemma 3 base GGUF, for
              which cas would supply Gemma's turn format). A base model whose files do carry a
              template (e.g. google/gemma-3-270m as an HF directory) needs `completion` explicitly.
`prompt_ids`, `system_prefix_ids`, `ids_after_system_prefix` and `document_context` follow the
tokenizer's format; `with_prompt_format(fmt)` gives a copy in another format.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from cas.model.errors import ModelLoadError

# llama.cpp `tokenizer.ggml.pre` -> the regex splits it applies, in order, before byte-level BPE
# (llama.cpp applies each regex to the pieces the previous one produced).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    # llama.cpp: every number code point alone, then the GPT-2 regex.
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,),
    "dbrx": (_LLAMA3_SPLIT,),
    "falcon3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
}
# Pre-tokenizers whose vocabularies take a whole piece that is in the vocabulary as one token
# before trying merges (llama.cpp `tokenizer_ignore_merges`, HF `ignore_merges`).
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4
# Gemma 3's chat template (google/gemma-3-* tokenizer_config.json), text parts only.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}"
    "{%- set role = \"model\" -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{'<start_of_turn>model\n'}}"
    "{%- endif -%}")
GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
_REPLY_SENTINEL = "cas-reply-sentinel-7f3a"
PROMPT_FORMATS = ("chat", "bare", "completion", "auto")
# completion format: the pieces around a system message (document), question and answer
COMPLETION_SYSTEM = "{system}\n\n"
COMPLETION_USER = "Question: {content}\n"
COMPLETION_GENERATION_PROMPT = "Answer:"
COMPLETION_ASSISTANT = "Answer: {content}\n"


def _offline() -> None:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ----------------------------------------------------------------------------- GGUF

def _gguf_fields(reader, keys: Sequence[str]) -> dict[str, Any]:
  out = {}
  for k in keys:
    f = reader.fields.get(k)
    if f is not None:
      out[k] = f.contents()
  return out


def _byte_level_from_gguf(meta: Mapping[str, Any], path: str):
  """A transformers fast tokenizer from GGUF byte-level BPE metadata (no torch needed)."""
  from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
  from tokenizers import Tokenizer as RawTokenizer
  from transformers import PreTrainedTokenizerFast

  tokens = list(meta["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
  if any(len(m) != 2 for m in merges):
    raise ModelLoadError(f"{path}: malformed entry in 'tokenizer.ggml.merges'")
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ModelLoadError(f"{path}: 'tokenizer.ggml.tokens' has duplicate tokens")
  pre = meta.get("tokenizer.ggml.pre", "default")
  raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                ignore_merges=pre in _IGNORE_MERGES))
  splits = PRE_TOKENIZER_SPLITS.get(pre)
  if splits is None:
    logging.warning("%s: unknown tokenizer.ggml.pre %r; splitting text like GPT-2, which may "
                    "differ from llama.cpp", path, pre)
    splits = PRE_TOKENIZER_SPLITS["default"]
  raw.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raw.decoder = decoders.ByteLevel()
  types = list(meta.get("tokenizer.ggml.token_type", []))
  special = [AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_CONTROL]
  user = [AddedToken(t, special=False, normalized=False)
          for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_USER_DEFINED]
  raw.add_special_tokens(special)
  raw.add_tokens(user)

  def tok(key):
    i = meta.get(f"tokenizer.ggml.{key}")
    if i is None:
      return None
    if not 0 <= int(i) < len(tokens):
      raise ModelLoadError(f"{path}: 'tokenizer.ggml.{key}' = {i} is outside the vocabulary")
    return tokens[int(i)]

  bos, eos = tok("bos_token_id"), tok("eos_token_id")
  single, specials = "$A", []
  if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
    single = f"{bos} {single}"
    specials.append((bos, vocab[bos]))
  if meta.get("tokenizer.ggml.add_eos_token") and eos is not None:
    single = f"{single} {eos}"
    specials.append((eos, vocab[eos]))
  if specials:
    raw.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
  kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos),
                              ("pad_token", tok("padding_token_id")),
                              ("unk_token", tok("unknown_token_id"))) if v is not None}
  return PreTrainedTokenizerFast(tokenizer_object=raw,
                                 chat_template=meta.get("tokenizer.chat_template"), **kwargs)


_GGUF_TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id",
    "tokenizer.chat_template", "general.architecture")


# what from_gguf reads of the metadata after the tokenizer is built (kept beside a cached tokenizer)
_GGUF_CACHED_KEYS = ("tokenizer.ggml.model", "general.architecture", "tokenizer.ggml.eot_token_id",
                     "tokenizer.ggml.eom_token_id")


def _plain(v):
  """A GGUF metadata value as a JSON-able Python value (numpy scalars to int/float/bool)."""
  return v.item() if isinstance(v, np.generic) else v


class _GGUFTokenizerCache:
  """Tokenizers built from GGUF files, saved with `save_pretrained` under `$CAS_HOME/tokenizers/<key>`.

  The key hashes the file's absolute path, size and modification time with the versions of transformers and
  tokenizers and `VERSION` (bump it when `_byte_level_from_gguf` or the kept metadata change), so a replaced
  file or a new library builds afresh. An entry is written to a temporary folder and renamed into place (two
  processes may build the same one; the first rename wins). An unreadable or inconsistent entry is built
  again, and a cache that cannot be written only logs a warning. Writing an entry removes those whose file is gone
  or has changed. `CAS_TOKENIZER_CACHE=0` turns it off, `=<dir>` moves it. An entry is ~2 MB for SmolLM2, ~35 MB
  for Gemma 3; deleting the folder only costs a rebuild."""

  VERSION = 1

  def _dir(self, path: str):
    from cas.fileio import cache_subdir
    root = cache_subdir("CAS_TOKENIZER_CACHE", "tokenizers")
    if root is None:
      return None
    import hashlib
    import tokenizers
    import transformers
    try:
      st = os.stat(path)
    except OSError:
      return None  # the loader names the missing file
    ident = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, self.VERSION,
                        transformers.__version__, tokenizers.__version__])
    return os.path.join(root, hashlib.sha256(ident.encode()).hexdigest()[:24])

  def load(self, path: str):
    """(hf tokenizer, kept metadata) from the cache, or None."""
    d = self._dir(path)
    if d is None or not os.path.isfile(os.path.join(d, "cas_gguf.json")):
      return None
    try:
      with open(os.path.join(d, "cas_gguf.json"), encoding="utf-8") as f:
        kept = json.load(f)
      _offline()
      from transformers import AutoTokenizer
      hf = AutoTokenizer.from_pretrained(d, local_files_only=True)
      if len(hf) != kept["len"] or kept["source"] != os.path.abspath(path):
        raise ValueError(f"holds {len(hf)} tokens for {kept['source']}, expected {kept['len']}")
    except Exception as e:  # a damaged entry: build again (and replace it)
      logging.warning("%s: the cached tokenizer in %s is unusable (%s); building it again", path, d, e)
      return None
    return hf, kept["meta"]

  def store(self, path: str, hf, meta: Mapping[str, Any]) -> None:
    d = self._dir(path)
    if d is None:
      return
    import shutil
    import tempfile
    try:
      os.makedirs(os.path.dirname(d), exist_ok=True)
      tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(d))
      try:
        hf.save_pretrained(tmp)
        st = os.stat(path)
        with open(os.path.join(tmp, "cas_gguf.json"), "w", encoding="utf-8") as f:
          json.dump({"source": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                     "len": len(hf), "meta": dict(meta)}, f)
        if os.path.isdir(d):  # a damaged entry (load refused it) or one another process just wrote
          shutil.rmtree(d, ignore_errors=True)
        os.rename(tmp, d)
      except OSError:
        if not os.path.isfile(os.path.join(d, "cas_gguf.json")):
          raise
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:
      logging.warning("%s: could not keep the tokenizer in %s (%s); it is rebuilt on the next load", path, d, e)
    self._prune(os.path.dirname(d))

  @staticmethod
  def _prune(root: str) -> None:
    """Removes the entries whose GGUF file is gone or has changed since (a deleted or replaced model, a test's
    temporary file): only a new entry pays for the scan, and an entry in use is never one of them."""
    import shutil
    try:
      names = os.listdir(root)
    except OSError:
      return
    for name in names:
      entry = os.path.join(root, name)
      try:
        with open(os.path.join(entry, "cas_gguf.json"), encoding="utf-8") as f:
          kept = json.load(f)
        st = os.stat(kept["source"])
        stale = (st.st_size, st.st_mtime_ns) != (kept.get("size"), kept.get("mtime_ns"))
      except FileNotFoundError:
        stale = os.path.isdir(entry) and not name.startswith(".tmp-")  # its source is gone (or it has no json)
      except Exception:  # unreadable: left for load() to report and rebuild
        stale = False
      if stale:
        shutil.rmtree(entry, ignore_errors=True)


_gguf_tokenizer_cache = _GGUFTokenizerCache()


# ----------------------------------------------------------------------------- wrapper

@dataclasses.dataclass(frozen=True)
class LineStop:
  """Stop a generation at the end of its first non-empty line: right after the first id in
  `newline` ([V] bool: the id's text holds a line break) that follows an id in `text` ([V] bool:
  the id's text is not blank, holds no line break and is no end-of-sequence id)."""
  newline: np.ndarray
  text: np.ndarray


class Tokenizer:
  """A transformers fast tokenizer plus the ids cas needs (bos, pad, every end-of-generation id)."""

  prompt_format: str = "chat"  # "chat" | "bare" | "completion" (resolved; see the module doc)

  def __init__(self, hf, *, source: str = "tokenizer", extra_eos_ids: Sequence[int] = (),
               supplied_chat_template: bool = False):
    """supplied_chat_template: the chat template is cas's, not the model files' (a Gemma GGUF
    without one gets GEMMA_CHAT_TEMPLATE); `prompt_format="auto"` then picks completion."""
    self.hf = hf
    self.source = source
    self.supplied_chat_template = bool(supplied_chat_template)
    self._vocab_cache: dict = {}  # per-vocabulary tables, shared by with_prompt_format copies
    eos = []
    for i in [hf.eos_token_id, *extra_eos_ids, self._turn_end_id()]:
      if i is not None and int(i) not in eos:
        eos.append(int(i))
    if not eos:
      raise ModelLoadError(f"{source}: the tokenizer defines no end-of-sequence token")
    self._eos_ids = tuple(eos)

  # -- construction -------------------------------------------------------------------------
  @classmethod
  def from_path(cls, path: str | os.PathLike, *, gguf_reader=None) -> "Tokenizer":
    """From a `.gguf` file or a Hugging Face model directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
      return cls.from_hf_dir(path)
    if path.endswith(".gguf"):
      return cls.from_gguf(path, reader=gguf_reader)
    raise ModelLoadError(f"{path}: neither a .gguf file nor a model directory")

  @classmethod
  def from_hf_dir(cls, model_dir: str) -> "Tokenizer":
    _offline()
    from transformers import AutoTokenizer
    try:
      hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
      raise ModelLoadError(f"{model_dir}: cannot build a tokenizer from this directory: {e}") from e
    extra = []
    gen = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen):
      try:
        with open(gen, encoding="utf-8") as f:
          e = json.load(f).get("eos_token_id")
      except json.JSONDecodeError as err:
        raise ModelLoadError(f"{gen}: not valid JSON: {err}") from err
      extra = [e] if isinstance(e, int) else list(e or [])
    return cls(hf, source=model_dir, extra_eos_ids=extra)

  @classmethod
  def from_gguf(cls, path: str, reader=None) -> "Tokenizer":
    """From GGUF metadata. `reader`: an open `gguf.GGUFReader` of `path`, to avoid re-parsing.

    The tokenizer built from a file is kept in `$CAS_HOME/tokenizers` (`_gguf_tokenizer_cache`): a later
    load of the same file (path, size, modification time) reads it back instead of parsing the GGUF
    vocabulary again (Gemma 3's 262k entries: ~30 s on a 2-core VM, ~3 s from the cache)."""
    cached = _gguf_tokenizer_cache.load(path)
    if cached is not None:
      hf, meta = cached
    else:
      if reader is None:
        from cas.model.gguf_loader import open_gguf
        reader = open_gguf(path)
      meta = _gguf_fields(reader, _GGUF_TOKENIZER_KEYS)
      kind = meta.get("tokenizer.ggml.model")
      if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise ModelLoadError(f"{path}: GGUF has no tokenizer metadata (tokenizer.ggml.model/tokens)")
      if kind == "gpt2":
        hf = _byte_level_from_gguf(meta, path)
      else:
        _offline()
        from transformers import AutoTokenizer
        try:
          hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                             gguf_file=os.path.basename(path), local_files_only=True)
        except Exception as e:
          raise ModelLoadError(f"{path}: cannot build the {kind!r} tokenizer with transformers "
                               f"(needs torch installed): {e}") from e
      meta = {k: _plain(meta[k]) for k in _GGUF_CACHED_KEYS if k in meta}
      _gguf_tokenizer_cache.store(path, hf, meta)
    supplied = False
    if not hf.chat_template and str(meta.get("general.architecture", "")).startswith("gemma"):
      vocab = hf.get_vocab()
      if all(t in vocab for t in GEMMA_TURN_TOKENS):
        logging.info("%s: no chat template in the GGUF; using Gemma 3's turn format", path)
        hf.chat_template = GEMMA_CHAT_TEMPLATE
        supplied = True
    extra = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
             if k in meta]
    return cls(hf, source=path, extra_eos_ids=extra, supplied_chat_template=supplied)

  # -- ids ---------------------------------------------------------------------------------
  def _special_ids(self) -> set[int]:
    ids = set(self.hf.all_special_ids)
    ids.update(i for i, t in self.hf.added_tokens_decoder.items() if t.special)
    return ids

  def _turn_end_id(self) -> int | None:
    """The special token the chat template writes right after an assistant reply, if any."""
    if not self.hf.chat_template:
      return None
    try:
      text = self.hf.apply_chat_template(
          [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY_SENTINEL}],
          tokenize=False)
    except Exception as e:  # a template that rejects this conversation
      logging.warning("%s: could not render the chat template to find its end-of-turn token: %s",
                      self.source, e)
      return None
    at = text.rfind(_REPLY_SENTINEL)
    if at < 0:
      return None
    rest = text[at + len(_REPLY_SENTINEL):].lstrip(" \n")
    ids = self.hf.encode(rest, add_special_tokens=False) if rest else []
    return ids[0] if ids and ids[0] in self._special_ids() else None

  @property
  def bos_id(self) -> int | None:
    return self.hf.bos_token_id

  @property
  def pad_id(self) -> int:
    """The pad id, or the first EOS id when the files define no pad token."""
    return self.hf.pad_token_id if self.hf.pad_token_id is not None else self._eos_ids[0]

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return self._eos_ids

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (base vocabulary + added tokens)."""
    return len(self.hf)

  @property
  def chat_template(self) -> str | None:
    return self.hf.chat_template

  @property
  def has_own_chat_template(self) -> bool:
    """Whether the model's files carry a chat template (not one cas supplied)."""
    return bool(self.hf.chat_template) and not self.supplied_chat_template

  # -- prompt format -----------------------------------------------------------------------
  def resolve_prompt_format(self, fmt: str) -> str:
    """"chat", "bare" or "completion" for `fmt` in PROMPT_FORMATS ("auto": chat when the model's files
    carry a chat template, else completion). "bare" needs a template that renders a system message as
    its own turn (else there is no turn to leave out): ValueError naming the template's kind."""
    if fmt not in PROMPT_FORMATS:
      raise ValueError(f"prompt_format={fmt!r}: choose from {PROMPT_FORMATS}")
    if fmt == "auto":
      return "chat" if self.has_own_chat_template else "completion"
    if fmt == "bare":
      self._check_system_turn()  # ValueError where the template has no system turn of its own
    return fmt

  def with_prompt_format(self, fmt: str) -> "Tokenizer":
    """A copy of this tokenizer (sharing the vocabulary) whose prompts use `fmt` (resolved)."""
    out = copy.copy(self)
    out.prompt_format = self.resolve_prompt_format(fmt)
    if out.prompt_format != self.prompt_format:
      logging.info("%s: prompt format %s (asked: %s)", self.source, out.prompt_format, fmt)
    return out

  def _vocab_texts(self) -> list[str]:
    """The text of every id on its own (special tokens spelled out), computed once per vocabulary."""
    if "texts" not in self._vocab_cache:
      self._vocab_cache["texts"] = self.hf.batch_decode([[i] for i in range(len(self.hf))],
                                                        skip_special_tokens=False)
    return self._vocab_cache["texts"]

  @property
  def newline_ids(self) -> tuple[int, ...]:
    """Every id whose text holds a line break (computed once per vocabulary)."""
    if "newline_ids" not in self._vocab_cache:
      self._vocab_cache["newline_ids"] = tuple(i for i, t in enumerate(self._vocab_texts()) if "\n" in t)
    return self._vocab_cache["newline_ids"]

  @property
  def line_stop(self) -> "LineStop | None":
    """In completion format, `answer_length`'s rule as per-id tables for the sampler
    (`cas.model.sampler.Sampler.generate(line_stop=...)`), which then stops a row right after the
    line break that ends its first non-empty line instead of decoding tokens that are cut anyway;
    None in chat format (the whole generation is the answer)."""
    if self.prompt_format != "completion":
      return None
    if "line_stop" not in self._vocab_cache:
      texts = self._vocab_texts()
      newline = np.zeros(len(texts), bool)
      newline[list(self.newline_ids)] = True  # answer_length's line breaks
      text = np.array([bool(t.strip()) for t in texts], bool) & ~newline
      text[[i for i in self._eos_ids if i < len(texts)]] = False
      self._vocab_cache["line_stop"] = LineStop(newline, text)
    return self._vocab_cache["line_stop"]

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that stop a generation: the EOS ids (in both formats; a completion answer is then
    cut at the end of its first line by `answer_length`, since a base model often starts the
    answer with a line break)."""
    return self._eos_ids

  def answer_length(self, ids: Sequence[int]) -> int:
    """How many of the generated `ids` are the answer: all in chat format; in completion format
    up to and including the first line break (a token holding a newline) that follows text, i.e.
    the end of the first non-empty line (leading line breaks are kept; the base model writes
    "Answer:\n\n<text>\n" as often as "Answer: <text>\n")."""
    if self.prompt_format != "completion":
      return len(ids)
    nl, seen_text = set(self.newline_ids), False
    for j, t in enumerate(ids):
      t = int(t)
      if t in nl and seen_text:
        return j + 1
      if t not in nl and t not in self._eos_ids and self.decode([t], skip_special_tokens=False).strip():
        seen_text = True
    return len(ids)

  @property
  def answer_prefix(self) -> str:
    """Text before an answer's first word right after the prompt (completion: the space after
    "Answer:"), e.g. for scoring multiple-choice options."""
    return " " if self.prompt_format == "completion" else ""

  def document_context(self, chat_text: str, document: str) -> str:
    """The system message that gives the model `document`: in chat format `chat_text` (an
    instruction around the document), in completion format the document alone."""
    return document if self.prompt_format == "completion" else chat_text

  def _bos_prefix(self) -> list[int]:
    """[BOS] when the tokenizer adds BOS to encoded text (Gemma, Llama 3), else []."""
    bos = self.bos_id
    if bos is None:
      return []
    probe = self.hf.encode("a", add_special_tokens=True)
    return [int(bos)] if probe and probe[0] == bos else []

  def _completion_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
    """The completion-format text of user/assistant messages (no system message)."""
    parts = []
    for m in messages:
      role, content = m["role"], str(m["content"]).strip()
      if role == "user":
        parts.append(COMPLETION_USER.format(content=content))
      elif role == "assistant":
        parts.append(COMPLETION_ASSISTANT.format(content=content))
      else:
        raise ValueError(f"{self.source}: completion format: a {role!r} message may only come first "
                         "(system) or be 'user'/'assistant'")
    if add_generation_prompt:
      parts.append(COMPLETION_GENERATION_PROMPT)
    return "".join(parts)

  def _completion_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """[BOS] + the system message's piece + the conversation's piece, each tokenized alone (so a
    conversation with a document is its document prefix followed by the same tokens as without)."""
    msgs = list(messages)
    ids = self._bos_prefix()
    if msgs and msgs[0]["role"] == "system":
      ids += self.encode(COMPLETION_SYSTEM.format(system=str(msgs.pop(0)["content"]).strip()))
    return ids + self.encode(self._completion_text(msgs, add_generation_prompt))

  def prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` in this tokenizer's prompt format: `apply_chat_template` (chat; bare
    without a default system turn), or the completion form (module doc). The one function self-study
    and evaluation build their prompts with."""
    if self.prompt_format == "completion":
      return self._completion_ids(messages, add_generation_prompt)
    if self.prompt_format == "bare" and not (messages and messages[0]["role"] == "system"):
      return self.prompt_ids_without_system(messages, add_generation_prompt)
    return self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

  # -- text <-> ids ------------------------------------------------------------------------
  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                          **template_kwargs) -> list[int]:
    """Token ids of `messages` ([{"role": ..., "content": ...}]) rendered by the chat template.

    The template writes BOS itself when the model wants it, so no special tokens are added.
    """
    if not self.hf.chat_template:
      raise ModelLoadError(
          f"{self.source}: the tokenizer has no chat template (HF: tokenizer_config.json "
          "'chat_template' or chat_template.jinja; GGUF: 'tokenizer.chat_template')")
    text = self.hf.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt,
                                       **template_kwargs)
    return self.encode(text, add_special_tokens=False)

  # -- a system message as a reusable prefix ------------------------------------------------
  def _system_rendering_holds_it(self, system: str) -> bool:
    """Whether the template renders a lone system message with its text (ChatML, Llama 3); Gemma's
    folds the system message into the first user turn instead, so alone it renders as BOS."""
    text = self.hf.apply_chat_template([{"role": "system", "content": system}], tokenize=False,
                                       add_generation_prompt=False)
    return system.strip() in text

  def _system_prefix_text(self, system: str) -> str:
    """The rendering of [system, user] up to where the user's words begin."""
    text = self.hf.apply_chat_template([{"role": "system", "content": system},
                                        {"role": "user", "content": _REPLY_SENTINEL}], tokenize=False,
                                       add_generation_prompt=False)
    at = text.find(_REPLY_SENTINEL)
    if at < 0:
      raise ModelLoadError(f"{self.source}: the chat template drops the user's message")
    return text[:at]

  def _check_system_turn(self) -> None:
    """That the chat template renders a system message as its own turn: [system, *messages] renders as the lone
    system message followed by the messages' own turns (checked with the sentinel, a text no template rewrites;
    once per template). ValueError otherwise (Gemma folds it into the user turn): prompt format 'bare' has no
    turn to leave out there."""
    if not self.hf.chat_template:
      raise ValueError(f"{self.source}: prompt format 'bare' needs a chat template (this tokenizer has none)")
    key = ("system_turn_checked", self.hf.chat_template)  # every bare prompt asks
    if key in self._vocab_cache:
      return
    system = [{"role": "system", "content": _REPLY_SENTINEL}]
    sys_only = self.hf.apply_chat_template(system, tokenize=False, add_generation_prompt=False)
    probe = self.hf.apply_chat_template(system + [{"role": "user", "content": "q"}], tokenize=False,
                                        add_generation_prompt=False)
    if _REPLY_SENTINEL not in sys_only or not probe.startswith(sys_only) or _REPLY_SENTINEL in probe[len(sys_only):]:
      raise ValueError(f"{self.source}: the chat template does not render the system message as its own turn "
                       "(e.g. Gemma folds it into the user turn), so there is no system turn to leave out "
                       "(prompt format 'bare'); use 'chat'")
    self._vocab_cache[key] = True

  def prompt_ids_without_system(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """`prompt_ids(messages)` with no system turn at all, where the template would insert its default one
    (SmolLM2's "You are a helpful AI assistant named SmolLM..."): what follows a system turn of its own
    (`ids_after_system_prefix` of the sentinel), the "bare" prompt format. A template that folds the system
    message into the user turn (Gemma) has no turn to leave out: ValueError."""
    self._check_system_turn()
    return self.ids_after_system_prefix(_REPLY_SENTINEL, messages, add_generation_prompt)

  def system_prefix_ids(self, system: str) -> list[int]:
    """Token ids that every conversation opening with system message `system` starts with, for
    prefilling a document once (ICL). Templates that render the system message as its own turn:
    that turn (`apply_chat_template([system])`, as before). Templates that fold it into the first
    user turn (Gemma): everything up to the user's own words (BOS, the user-turn header, the
    system text and its separator). Completion format: [BOS] + the document piece."""
    if self.prompt_format == "completion":
      return self._completion_ids([{"role": "system", "content": system}], add_generation_prompt=False)
    if self._system_rendering_holds_it(system):
      return self.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False)
    return self.encode(self._system_prefix_text(system))

  def ids_after_system_prefix(self, system: str, messages: list[dict],
                              add_generation_prompt: bool = True) -> list[int]:
    """The ids that follow `system_prefix_ids(system)` in the conversation [system] + messages.
    Where the template folds the system message into the user turn, the rest of the rendered
    text is tokenized on its own (the boundary falls after the system text's separator)."""
    if self.prompt_format == "completion":
      return self.encode(self._completion_text(list(messages), add_generation_prompt))
    conv = [{"role": "system", "content": system}] + list(messages)
    if self._system_rendering_holds_it(system):
      prefix = self.system_prefix_ids(system)
      full = self.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
      if full[:len(prefix)] != prefix:
        raise ModelLoadError(f"{self.source}: the chat template's rendering of a conversation does "
                             "not start with its rendering of the system message alone")
      return full[len(prefix):]
    head = self._system_prefix_text(system)
    text = self.hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not text.startswith(head):
      raise ModelLoadError(f"{self.source}: the chat template renders the first user message "
                           "differently after the system text; cannot split off a system prefix")
    return self.encode(text[len(head):])

  def __repr__(self) -> str:
    fmt = "" if self.prompt_format == "chat" else f", prompt_format={self.prompt_format!r}"
    return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"pad_id={self.pad_id}, eos_ids={self.eos_ids}{fmt})")
