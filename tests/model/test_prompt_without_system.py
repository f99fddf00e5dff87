"""Tokenizer.prompt_ids_without_system: the question after a cartridge without the chat template's default system turn
(SmolLM2's template adds "You are a helpful AI assistant named SmolLM..." when a conversation has none;
benchmarks.init_oracle --prompt=bare, RESULTS.md "The window and what follows the cartridge")."""
import pytest

from cas.model import fetch
from cas.model.tokenizer import Tokenizer
from cas.testing import real_tokenizer


_GEMMA = {}


def _gemma():
  """Gemma's tokenizer (its template folds a system message into the user turn), read once for this module's
  tests; skips when the model is not fetched."""
  path = fetch.named_model_path("gemma3-270m")
  if not path.is_file():
    pytest.skip(f"{path} not fetched (python -m launch.fetch_model --model=gemma3-270m)")
  if "tok" not in _GEMMA:
    _GEMMA["tok"] = Tokenizer.from_gguf(str(path))
  return _GEMMA["tok"]


def test_the_prompt_without_system_is_the_template_without_its_system_turn():
  tok = real_tokenizer()
  msgs = [{"role": "user", "content": "Which medication was started?"}]
  full = tok.decode(tok.prompt_ids(msgs), skip_special_tokens=False)
  bare = tok.decode(tok.prompt_ids_without_system(msgs), skip_special_tokens=False)
  assert "system" in full and "system" not in bare  # the default system turn is what it leaves out
  assert full.endswith(bare) and bare.startswith("<|im_start|>user\nWhich medication was started?")
  assert bare.endswith("<|im_start|>assistant\n")  # still asks for the answer


def test_a_template_that_folds_the_system_message_into_the_user_turn_is_refused():
  tok = _gemma()
  with pytest.raises(ValueError, match="does not render the system message as its own turn"):
    tok.prompt_ids_without_system([{"role": "user", "content": "Who?"}])


def test_the_bare_prompt_format_leaves_out_only_the_default_system_turn():
  """prompt_format "bare": a conversation without a system message renders without the template's default
  turn (with or without the generation prompt); one with a system message renders as in chat format."""
  chat = real_tokenizer()
  bare = chat.with_prompt_format("bare")
  assert bare.prompt_format == "bare" and chat.prompt_format == "chat"
  q = [{"role": "user", "content": "Which medication was started?"}]
  assert bare.prompt_ids(q) == chat.prompt_ids_without_system(q) != chat.prompt_ids(q)
  no_gen = bare.decode(bare.prompt_ids(q, add_generation_prompt=False), skip_special_tokens=False)
  assert no_gen == "<|im_start|>user\nWhich medication was started?<|im_end|>\n"
  doc = [{"role": "system", "content": "Record of Ana Ruiz."}] + q  # ICL: the document's own system turn
  assert bare.prompt_ids(doc) == chat.prompt_ids(doc)
  assert bare.system_prefix_ids("Record of Ana Ruiz.") == chat.system_prefix_ids("Record of Ana Ruiz.")
  rec = "Record of Ana Ruiz."
  assert bare.ids_after_system_prefix(rec, q) == chat.ids_after_system_prefix(rec, q)


def test_bare_is_refused_where_the_template_has_no_system_turn_of_its_own():
  tok = _gemma()
  with pytest.raises(ValueError, match="no system turn to leave out.*'bare'"):
    tok.with_prompt_format("bare")
