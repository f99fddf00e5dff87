"""Tokenizer: built from HF directories and GGUF metadata; ids, special ids, chat template."""
import json
import os

import pytest
from gguf import GGMLQuantizationType as QType
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

from cas.model.errors import ModelLoadError
from cas.model.tokenizer import Tokenizer
from tests.model import _tiny

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 12 + 30?"}]


@pytest.fixture(scope="module")
def hf_tok():
  return _tiny.tiny_tokenizer()


def test_hf_dir(tmp_path, hf_tok):
  hf_tok.save_pretrained(tmp_path)
  json.dump({"eos_token_id": [2, 0], "bos_token_id": 1}, open(tmp_path / "generation_config.json", "w"))
  tok = Tokenizer.from_path(str(tmp_path))
  im_end, eot = hf_tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
  assert tok.eos_ids == (im_end, eot)
  assert tok.bos_id == hf_tok.convert_tokens_to_ids("<|im_start|>")
  assert tok.pad_id == im_end and tok.vocab_size == len(hf_tok) == 300
  for text in _tiny.TEXTS:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
  ids = tok.apply_chat_template(MESSAGES)
  text = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  assert text.endswith("<|im_start|>assistant\n")
  assert ids == hf_tok.encode(text, add_special_tokens=False)
  assert ids.count(tok.bos_id) == 3 and ids.count(im_end) == 2
  assert tok.decode(ids) == tok.decode(ids, skip_special_tokens=False).replace(
      "<|im_start|>", "").replace("<|im_end|>", "")
  no_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
  assert ids[:len(no_prompt)] == no_prompt and len(no_prompt) < len(ids)


def test_gguf_vocab_matches_hf_tokenizer(tmp_path, hf_tok):
  """A GGUF written from the tiny tokenizer (vocab padded to the model's 320 rows, like
  llama.cpp's converter) tokenizes like the original tokenizer."""
  path = _tiny.write_gguf(str(tmp_path / "m.gguf"), _tiny.tiny_model("llama"), QType.F32, hf_tok)
  tok = Tokenizer.from_path(path)
  assert tok.vocab_size == 320
  vocab = hf_tok.get_vocab()
  assert all(tok.hf.convert_tokens_to_ids(t) == i for t, i in vocab.items())
  assert tok.hf.convert_ids_to_tokens(310) == "[PAD310]"
  for text in _tiny.TEXTS + ["  leading spaces 1 2  3", "tabs\t\t9\n\n\n"]:
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
  assert tok.encode("a  1") == hf_tok.encode("a  1", add_special_tokens=False)
  assert tok.bos_id == hf_tok.bos_token_id and tok.pad_id == hf_tok.pad_token_id
  assert tok.eos_ids == (hf_tok.eos_token_id,)
  assert tok.apply_chat_template(MESSAGES) == hf_tok.encode(
      hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
      add_special_tokens=False)


def test_turn_end_token_and_pad_fallback(tmp_path, hf_tok):
  """eos_ids gets the chat template's end-of-turn special token; pad falls back to EOS."""
  raw = hf_tok.backend_tokenizer
  raw.add_special_tokens([AddedToken("<|eot|>", special=True, normalized=False)])
  template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", chat_template=template)
  tok = Tokenizer(hf, source="test")
  eot = hf.convert_tokens_to_ids("<|eot|>")
  assert tok.eos_ids == (hf.convert_tokens_to_ids("<|endoftext|>"), eot)
  assert tok.pad_id == tok.eos_ids[0] and tok.bos_id is None


def test_no_chat_template_is_a_clear_error(tmp_path, hf_tok):
  hf = PreTrainedTokenizerFast(tokenizer_object=hf_tok.backend_tokenizer, eos_token="<|im_end|>")
  hf.save_pretrained(tmp_path)
  tok = Tokenizer.from_path(str(tmp_path))
  assert tok.eos_ids == (hf.eos_token_id,)
  with pytest.raises(ModelLoadError, match="no chat template") as e:
    tok.apply_chat_template(MESSAGES)
  assert str(tmp_path) in str(e.value)


def test_bad_paths(tmp_path):
  with pytest.raises(ModelLoadError, match="neither a .gguf file nor a model directory"):
    Tokenizer.from_path(str(tmp_path / "x.bin"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ModelLoadError, match="cannot build a tokenizer"):
    Tokenizer.from_path(str(tmp_path / "empty"))


def _same_tokenizer(a: Tokenizer, b: Tokenizer, texts) -> None:
  assert type(a.hf) is type(b.hf) and a.vocab_size == b.vocab_size
  assert (a.eos_ids, a.bos_id, a.pad_id, a.chat_template) == (b.eos_ids, b.bos_id, b.pad_id, b.chat_template)
  for text in texts:
    assert a.encode(text) == b.encode(text), text
    assert a.hf.convert_ids_to_tokens(a.encode(text)) == b.hf.convert_ids_to_tokens(b.encode(text))
  assert a.apply_chat_template(MESSAGES) == b.apply_chat_template(MESSAGES)


def test_gguf_tokenizer_is_kept_and_read_back(tmp_path, hf_tok, monkeypatch, caplog):
  """A GGUF's tokenizer is built once and read back from $CAS_TOKENIZER_CACHE without parsing the file; a
  changed file builds a new entry (the stale one is removed), a damaged entry is rebuilt, a deleted file's entry
  goes, CAS_TOKENIZER_CACHE=0 keeps nothing."""
  from cas.model import gguf_loader
  cache = tmp_path / "cache"
  monkeypatch.setenv("CAS_TOKENIZER_CACHE", str(cache))
  path = _tiny.write_gguf(str(tmp_path / "m.gguf"), _tiny.tiny_model("llama"), QType.F32, hf_tok)
  texts = _tiny.TEXTS + ["  leading spaces 1 2  3", "tabs\t\t9\n\n\n", "<|im_start|>user\nhi<|im_end|>"]
  built = Tokenizer.from_path(path)
  (entry,) = list(cache.iterdir())
  assert (entry / "cas_gguf.json").is_file() and (entry / "tokenizer.json").is_file()
  real_open = gguf_loader.open_gguf

  def refuse(p):
    raise AssertionError(f"the cached tokenizer parsed {p}")
  monkeypatch.setattr(gguf_loader, "open_gguf", refuse)
  _same_tokenizer(built, Tokenizer.from_path(path), texts)  # read back, no parse
  monkeypatch.setattr(gguf_loader, "open_gguf", real_open)
  # the same path with other contents (a new modification time): a new entry, and the stale one removed
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  _same_tokenizer(built, Tokenizer.from_path(path), texts)
  (new,) = list(cache.iterdir())
  assert new != entry
  entry = new
  # a damaged entry: a warning naming it, the tokenizer built again and the entry repaired
  (entry / "tokenizer.json").write_text("{not json")
  with caplog.at_level("WARNING"):
    _same_tokenizer(built, Tokenizer.from_path(path), texts)
  assert "unusable" in caplog.text and str(entry) in caplog.text
  monkeypatch.setattr(gguf_loader, "open_gguf", refuse)
  _same_tokenizer(built, Tokenizer.from_path(path), texts)
  monkeypatch.setattr(gguf_loader, "open_gguf", real_open)
  # a deleted file's entry goes when another is written
  other = _tiny.write_gguf(str(tmp_path / "o.gguf"), _tiny.tiny_model("llama"), QType.F32, hf_tok)
  os.remove(path)
  _same_tokenizer(built, Tokenizer.from_path(other), texts)
  (only,) = list(cache.iterdir())
  assert only != entry and json.loads((only / "cas_gguf.json").read_text())["source"] == os.path.abspath(other)
  # off: nothing kept
  monkeypatch.setenv("CAS_TOKENIZER_CACHE", "0")
  third = _tiny.write_gguf(str(tmp_path / "t.gguf"), _tiny.tiny_model("llama"), QType.F32, hf_tok)
  _same_tokenizer(built, Tokenizer.from_path(third), texts)
  assert list(cache.iterdir()) == [only]
