"""launch.generate's prompt format (issue 24): config.prompt_format (default auto) resolved as in
evaluation; a tokenizer without a chat template (a base model) gets the completion prompt
"Question: {prompt}\\nAnswer:" and the first non-empty line; chat keeps the chat template; an
unknown format is refused naming the field."""
from __future__ import annotations

import copy
import dataclasses

import pytest

from cas.config_check import ConfigError
from cas.model.sampler import Sampler
from cas.model.tokenizer import Tokenizer
from cas.testing import tiny_smol_lm
from configs.generate import get_config
from launch.generate import generate_text, validate


@pytest.fixture(scope="module")
def lms():
  """The tiny random model with SmolLM2's tokenizer (chat template) and the same tokenizer without one."""
  lm = tiny_smol_lm(seed=1)
  hf = copy.deepcopy(lm.tokenizer.hf)
  hf.chat_template = None
  return lm, dataclasses.replace(lm, tokenizer=Tokenizer(hf, source="smollm2-without-template"))


def _config(**kw):
  c = get_config()
  c.prompt, c.max_new_tokens = "Who kept the lighthouse?", 12
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _reference(lm, ids, n):
  gen = Sampler(lm.model, pad_id=lm.tokenizer.pad_id).generate([ids], max_new_tokens=n,
                                                                stop_ids=lm.tokenizer.eos_ids)[0]
  return gen.tokens.tolist()


def test_auto_uses_completion_without_a_chat_template(lms):
  _, base = lms
  c = _config()
  assert c.prompt_format == "auto"
  text, gen = generate_text(base, c)
  tok = base.tokenizer.with_prompt_format("completion")  # what auto resolves to without a template
  prompt = tok.encode("Question: Who kept the lighthouse?\nAnswer:")
  assert gen.num_prompt_tokens == len(prompt)
  toks = _reference(base, prompt, 12)
  toks = toks[:tok.answer_length(toks)]  # the sampler stops at the end of the first line (Tokenizer.line_stop)
  assert gen.tokens.tolist() == toks
  assert text == tok.decode(toks).strip() and text
  # with a system message: the document piece first, as evaluation's ICL prompt
  _, gen2 = generate_text(base, _config(system="The keeper was Edda."))
  piece = tok.encode("The keeper was Edda.\n\n")  # tokenized on its own (a reusable document prefix)
  ref2 = _reference(base, piece + prompt, 12)
  assert gen2.num_prompt_tokens == len(piece + prompt) and gen2.tokens.tolist() == ref2[:tok.answer_length(ref2)]


def test_chat_format_and_explicit_choices(lms):
  lm, base = lms
  text, gen = generate_text(lm, _config())  # auto: the template of the model's files
  ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Who kept the lighthouse?"}])
  assert gen.num_prompt_tokens == len(ids) and text == lm.tokenizer.decode(_reference(lm, ids, 12))
  _, forced = generate_text(lm, _config(prompt_format="completion"))  # a template, but completion asked
  assert forced.num_prompt_tokens == len(lm.tokenizer.encode("Question: Who kept the lighthouse?\nAnswer:"))
  with pytest.raises(Exception, match="no chat template"):
    generate_text(base, _config(prompt_format="chat"))


def test_unknown_prompt_format_is_refused():
  with pytest.raises(ConfigError, match="config.prompt_format"):
    validate(_config(prompt_format="plain"))
  validate(_config(prompt_format="completion"))
