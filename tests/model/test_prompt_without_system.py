"""Tokenizer.prompt_ids_without_system: the question after a cartridge without the chat template's default system turn
(SmolLM2's template adds "You are a helpful AI assistant named SmolLM..." when a conversation has none;
benchmarks.init_oracle --prompt=bare, RESULTS.md "The window and what follows the cartridge")."""
import pytest

from cas.model import fetch
from cas.model.loader import load_model
from cas.model.tokenizer import Tokenizer


def test_the_prompt_without_system_is_the_template_without_its_system_turn():
  tok = load_model().tokenizer
  msgs = [{"role": "user", "content": "Which medication was started?"}]
  full = tok.decode(tok.prompt_ids(msgs), skip_special_tokens=False)
  bare = tok.decode(tok.prompt_ids_without_system(msgs), skip_special_tokens=False)
  assert "system" in full and "system" not in bare  # the default system turn is what it leaves out
  assert full.endswith(bare) and bare.startswith("<|im_start|>user\nWhich medication was started?")
  assert bare.endswith("<|im_start|>assistant\n")  # still asks for the answer


def test_a_template_that_folds_the_system_message_into_the_user_turn_is_refused():
  path = fetch.named_model_path("gemma3-270m")
  if not path.is_file():
    pytest.skip(f"{path} not fetched (python -m launch.fetch_model --model=gemma3-270m)")
  tok = Tokenizer.from_gguf(str(path))
  with pytest.raises(ValueError, match="does not render the system message as its own turn"):
    tok.prompt_ids_without_system([{"role": "user", "content": "Who?"}])
