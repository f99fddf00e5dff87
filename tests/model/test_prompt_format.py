"""Prompt formats of cas.model.tokenizer (issue 24): the completion form for base models is the
documented text, its document prefix splits off exactly, chat stays the chat template, `auto`
picks chat for SmolLM2-Instruct and completion for the Gemma 3 270M base GGUF."""
import os

import numpy as np
import pytest

from cas.config_check import check_config
from cas.model.tokenizer import Tokenizer
from cas.testing import real_tokenizer
from configs.cartridge import get_config as cartridge_config

GEMMA_GGUF = os.path.expanduser("~/.cache/cas/models/gemma-3-270m-q4_k_m.gguf")
DOC = "Patient Ana Ruiz was admitted on May 2, 2023."
CONV = [{"role": "system", "content": DOC}, {"role": "user", "content": "When was Ana Ruiz admitted?"}]


def _text(tok, ids):
  return tok.decode(ids, skip_special_tokens=False)


def test_completion_prompts_are_the_documented_strings():
  tok = real_tokenizer().with_prompt_format("completion")
  assert tok.prompt_format == "completion" and real_tokenizer().prompt_format == "chat"  # a copy
  assert _text(tok, tok.prompt_ids(CONV)) == f"{DOC}\n\nQuestion: When was Ana Ruiz admitted?\nAnswer:"
  assert _text(tok, tok.prompt_ids(CONV[1:])) == "Question: When was Ana Ruiz admitted?\nAnswer:"
  two = CONV[1:] + [{"role": "assistant", "content": "On May 2, 2023."}, {"role": "user", "content": "Why?"}]
  assert _text(tok, tok.prompt_ids(two)) == ("Question: When was Ana Ruiz admitted?\nAnswer: On May 2, 2023.\n"
                                            "Question: Why?\nAnswer:")
  # the document prefix (ICL, the teacher's chunk) splits off the same tokens as the full prompt
  assert tok.system_prefix_ids(DOC) + tok.ids_after_system_prefix(DOC, CONV[1:]) == tok.prompt_ids(CONV)
  assert tok.ids_after_system_prefix(DOC, CONV[1:]) == tok.prompt_ids(CONV[1:])  # SmolLM2 adds no BOS
  assert not set(tok.prompt_ids(CONV)) & tok._special_ids()  # no chat tokens
  assert tok.document_context("Use this:\n" + DOC, DOC) == DOC and tok.answer_prefix == " "
  # the answer: the first non-empty line (leading line breaks do not end it)
  (nl,), (nl2,), (yes,) = tok.encode("\n"), tok.encode("\n\n"), tok.encode(" yes")
  assert {nl, nl2} <= set(tok.newline_ids) and yes not in tok.newline_ids and tok.stop_ids == tok.eos_ids
  assert all("\n" in tok.decode([i], skip_special_tokens=False) for i in tok.newline_ids)
  assert tok.answer_length([yes, nl, yes, nl]) == 2
  assert tok.answer_length([nl2, nl, yes, yes, nl2, yes]) == 5
  assert tok.answer_length([nl, yes, yes]) == 3 and tok.answer_length([]) == 0
  assert real_tokenizer().answer_length([yes, nl, yes, nl]) == 4  # chat: the whole generation


def test_line_stop_tables_follow_answer_length():
  """`Tokenizer.line_stop` is answer_length's rule as per-id tables (the sampler stops where
  answer_length cuts); chat format has none."""
  tok = real_tokenizer().with_prompt_format("completion")
  ls = tok.line_stop
  assert real_tokenizer().line_stop is None and ls.newline.shape == ls.text.shape == (len(tok.hf),)
  assert set(np.flatnonzero(ls.newline)) == set(tok.newline_ids) and not np.any(ls.newline & ls.text)
  assert not ls.text[list(tok.eos_ids)].any() and not ls.text[tok.encode(" ")].any()
  (nl,), (nl2,), (yes,) = tok.encode("\n"), tok.encode("\n\n"), tok.encode(" yes")
  rng = np.random.default_rng(0)
  pool = [nl, nl2, yes, *tok.encode(" "), *tok.eos_ids, *rng.integers(0, len(tok.hf), 8).tolist()]
  for _ in range(200):
    ids = [int(pool[i]) for i in rng.integers(0, len(pool), int(rng.integers(0, 9)))]
    seen, cut = False, len(ids)
    for j, t in enumerate(ids):
      if ls.newline[t] and seen:
        cut = j + 1
        break
      seen = seen or bool(ls.text[t])
    assert cut == tok.answer_length(ids), ids


def test_chat_format_is_the_chat_template():
  tok = real_tokenizer()
  chat = tok.with_prompt_format("chat")
  assert chat.prompt_ids(CONV) == tok.apply_chat_template(CONV, add_generation_prompt=True)
  assert "<|im_start|>user\n" in _text(chat, chat.prompt_ids(CONV))
  assert chat.stop_ids == tok.eos_ids and chat.answer_prefix == ""
  assert chat.document_context("Use this:\n" + DOC, DOC) == "Use this:\n" + DOC
  assert tok.with_prompt_format("auto").prompt_format == "chat"  # SmolLM2-Instruct's GGUF has a template
  assert tok.has_own_chat_template


def test_unknown_prompt_format_is_refused_naming_the_field():
  with pytest.raises(ValueError, match="prompt_format='plain'"):
    real_tokenizer().with_prompt_format("plain")
  c = cartridge_config("tiny")
  c.prompt_format = "plain"
  problems = {p.where: p.message for p in check_config(c, "cas", check_model=False)}
  assert "config.prompt_format" in problems and "completion" in problems["config.prompt_format"]
  for fmt in ("chat", "completion", "auto"):
    c.prompt_format = fmt
    assert "config.prompt_format" not in {p.where for p in check_config(c, "cas", check_model=False)}


def test_auto_picks_completion_for_the_gemma3_base_gguf():
  if not os.path.isfile(GEMMA_GGUF):
    pytest.skip(f"{GEMMA_GGUF} is missing: run `python -m launch.fetch_model --model=gemma3-270m`")
  gemma = Tokenizer.from_path(GEMMA_GGUF)  # the tokenizer only (GGUF metadata), not the weights
  assert gemma.supplied_chat_template and not gemma.has_own_chat_template  # cas's Gemma turns
  tok = gemma.with_prompt_format("auto")
  assert tok.prompt_format == "completion"
  ids = tok.prompt_ids(CONV)
  assert ids[0] == tok.bos_id == 2  # Gemma wants BOS first
  assert _text(tok, ids) == f"<bos>{DOC}\n\nQuestion: When was Ana Ruiz admitted?\nAnswer:"
  assert "<start_of_turn>" not in _text(tok, ids)
  assert tok.system_prefix_ids(DOC) + tok.ids_after_system_prefix(DOC, CONV[1:]) == ids
  assert _text(tok, tok.prompt_ids(CONV[1:])) == "<bos>Question: When was Ana Ruiz admitted?\nAnswer:"
  (nl,), (nl2,), (may,) = tok.encode("\n"), tok.encode("\n\n"), tok.encode(" May")
  assert tok.answer_length([nl2, may, nl, may]) == 3
  # the answer's leading space is the same token as in running text
  assert tok.encode(" May") == tok.encode("Answer: May")[-1:]
  # chat is still there when asked for
  assert "<start_of_turn>user\n" in _text(tok, gemma.with_prompt_format("chat").prompt_ids(CONV))
