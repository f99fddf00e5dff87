"""Evaluation in the completion prompt format (issue 24: base models): the ICL prompt is the
document then "Question: ...\nAnswer:", options are scored with their leading space after it,
a short answer is the first non-empty line generated."""
import numpy as np
import pytest

from cas.data.types import Document, Question
from cas.eval.methods import Evaluator
from cas.eval.scoring import score_continuations
from cas.model.llama import build_model
from cas.model.sampler import Sampler
from cas.testing import TINY_SMOL_VOCAB, real_tokenizer
from tests.model._line import line_model

DOC = Document("d0", "Record", "Patient Ana Ruiz was born on March 3, 1961. Her physician is Dr. Omar Haddad.")
MC = Question("q1", "d0", "mc", "Who is Ana Ruiz's physician?", ["Dr. Omar Haddad", "Dr. Lee Chan"], answer_index=0)
SHORT = Question("q2", "d0", "short", "When was Ana Ruiz born?", answer="yes")


@pytest.fixture(scope="module")
def tok():
  return real_tokenizer().with_prompt_format("completion")


def test_icl_and_no_context_prompts_and_option_scores(tok):
  model = build_model(TINY_SMOL_VOCAB, seed=1)
  ev = Evaluator(model, tok, Sampler(model, pad_id=tok.pad_id), max_new_tokens=4)
  ctx = ev.icl([DOC])
  prompt = ev._prompt_ids(ctx, SHORT)
  text = tok.decode(tok.system_prefix_ids(ctx.system) + prompt, skip_special_tokens=False)
  assert text == f"# Record\n{DOC.text}\n\nQuestion: When was Ana Ruiz born?\nAnswer:"  # no "Answer briefly."
  assert tok.decode(ev._prompt_ids(ev.no_context(), MC)) == "Question: Who is Ana Ruiz's physician?\nAnswer:"
  # options are scored as " <option>" after "Answer:", the document in a prefix KV or in the prompt alike
  r = ev.answer(ctx, MC)
  conts = [tok.encode(" " + o) for o in MC.options]
  s, n = score_continuations(model, None, tok.system_prefix_ids(ctx.system) + ev._prompt_ids(ctx, MC), conts)
  np.testing.assert_allclose(r.option_scores, s / n, atol=2e-4)


def test_short_answer_stops_at_the_end_of_the_line(tok):
  model, yes, nl = line_model(tok)
  sampler = Sampler(model, pad_id=tok.pad_id)
  ev = Evaluator(model, tok, sampler, max_new_tokens=8)
  done = ev.answer(ev.no_context(), SHORT)
  assert done.prediction == " yes\n" and done.correct  # " yes", then the newline that ends it
  # what the model wrote: the same line again and again, to the token limit
  g = sampler.generate([tok.prompt_ids([{"role": "user", "content": SHORT.question}])], max_new_tokens=8,
                       stop_ids=tok.stop_ids)[0]
  assert g.tokens.tolist() == [yes, nl] * 4 and g.finish_reason == "length"
  chat_ev = Evaluator(model, real_tokenizer(), sampler, max_new_tokens=8)  # chat: the whole generation
  assert chat_ev.answer(chat_ev.no_context(), SHORT).prediction == " yes\n yes\n yes\n yes\n"
