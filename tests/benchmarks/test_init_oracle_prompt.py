"""benchmarks/init_oracle.py --prompt=bare: the question after a cartridge without the chat template's default system
turn (SmolLM2's template adds "You are a helpful AI assistant named SmolLM..." when a conversation has none)."""
import pytest
from absl import app

from benchmarks.init_oracle import bare_prompt_ids
from cas.model import fetch
from cas.model.tokenizer import Tokenizer


def _smollm2():
  from cas.model.loader import load_model
  return load_model().tokenizer


def test_bare_prompt_is_the_template_without_its_system_turn():
  tok = _smollm2()
  msgs = [{"role": "user", "content": "Which medication was started?"}]
  full = tok.decode(tok.prompt_ids(msgs), skip_special_tokens=False)
  bare = tok.decode(bare_prompt_ids(tok, msgs), skip_special_tokens=False)
  assert "system" in full and "system" not in bare  # the default system turn is what bare leaves out
  assert full.endswith(bare) and bare.startswith("<|im_start|>user\nWhich medication was started?")
  assert bare.endswith("<|im_start|>assistant\n")  # still asks for the answer


def test_bare_prompt_refuses_a_template_that_folds_the_system_message_into_the_user_turn():
  path = fetch.named_model_path("gemma3-270m")
  if not path.is_file():
    pytest.skip(f"{path} not fetched (python -m launch.fetch_model --model=gemma3-270m)")
  tok = Tokenizer.from_gguf(str(path))
  with pytest.raises(app.UsageError, match="does not render the system message as its own turn"):
    bare_prompt_ids(tok, [{"role": "user", "content": "Who?"}])
