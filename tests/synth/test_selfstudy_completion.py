"""Self-study in the completion prompt format (issue 24: base models): bot B reads
"{chunk}\n\nQuestion: {message}\nAnswer:", its answer cut at the end of its first line, the student's
sequence is "Question: {message}\nAnswer:" + the answer with no chat token, the manifest records
the format and a resume in another format is refused."""
import numpy as np
import pytest

from cas.data.types import Document
from cas.model.llama import build_model
from cas.model.sampler import Sampler
from cas.synth.format import SynthDataError, SynthDataset
from cas.synth.selfstudy import (TEMPLATE_PROMPTS, DocTokens, SynthConfig, _plan, generate_shard, synthesize,
                                 template_message)
from cas.testing import TINY_SMOL_VOCAB, real_tokenizer
from tests.model._line import line_model
from tests.synth._teacher import teacher_logprobs

TEXT = ("Patient Ana Ruiz, born March 3, 1961, was admitted on May 2, 2023 with pneumonia. "
        "Her attending physician was Dr. Omar Haddad. She takes metformin 500 mg twice daily. ") * 6
CFG = SynthConfig(conversations_per_doc=4, shard_size=2, batch_size=2, min_chunk=24, max_chunk=48,
                  max_user_tokens=6, max_answer_tokens=8, top_k=5, seed=3, families=("quote", "question"))


def _run(tok, model, d, cfg=CFG):
  return synthesize(d, documents=[Document("d0", "t", TEXT)], tokenizer=tok, sampler=Sampler(model, pad_id=tok.pad_id),
                    cfg=cfg, model_fingerprint="tiny", model_source="tiny")


def test_records_in_completion_format(tmp_path):
  tok = real_tokenizer().with_prompt_format("completion")
  model = build_model(TINY_SMOL_VOCAB, seed=0)
  m = _run(tok, model, str(tmp_path))
  assert m["prompt_format"] == "completion"
  convs = SynthDataset(str(tmp_path)).load_all()
  assert {c.seed_family for c in convs} == {"quote", "question"}
  doc_ids, special = tok.encode(TEXT), tok._special_ids()
  checks = []
  for g, c in enumerate(convs):
    prompt = tok.decode(list(c.prompt_ids), skip_special_tokens=False)
    assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
    assert not (set(c.prompt_ids.tolist()) | set(c.answer_ids.tolist())) & special  # no chat tokens
    msg = prompt[len("Question: "):-len("\nAnswer:")]
    (s, e), fam, template, sseed, _ = _plan(CFG, g, len(doc_ids))
    chunk = tok.decode(doc_ids[s:e])
    if fam == "quote":  # the templated message, as in chat format
      assert template in TEMPLATE_PROMPTS["quote"] and msg == template_message("quote", template, chunk, sseed, title="t")
    else:  # bot A's one line
      assert msg and "\n" not in msg
    b_prompt = tok.prompt_ids([{"role": "system", "content": chunk}, {"role": "user", "content": msg}])
    assert tok.decode(b_prompt) == f"{chunk.strip()}\n\n{prompt}"  # the student's prompt after the chunk
    checks.append((b_prompt, c))
  for lp, (_, c) in zip(teacher_logprobs(model, [(p, c.answer_ids) for p, c in checks]), checks):
    np.testing.assert_allclose(np.take_along_axis(lp, c.topk_ids, -1), c.topk_logprobs, atol=2e-4)
  with pytest.raises(SynthDataError, match="prompt format 'completion'.*'chat'"):
    _run(real_tokenizer(), model, str(tmp_path))  # resuming in chat format


def test_answers_stop_at_the_end_of_the_line(tmp_path):
  tok = real_tokenizer().with_prompt_format("completion")
  model, yes, nl = line_model(tok)
  _run(tok, model, str(tmp_path), cfg=SynthConfig(**{**CFG.__dict__, "families": ("quote",)}))
  convs = SynthDataset(str(tmp_path)).load_all()
  assert len(convs) == 4 and all(c.answer_ids.tolist() == [yes, nl] for c in convs)  # " yes\n", cut there
  # the sampler stops there too (Tokenizer.line_stop): two tokens decoded per answer, not eight
  counted = []
  cfg = SynthConfig(**{**CFG.__dict__, "families": ("quote",)})
  generate_shard(0, docs=DocTokens([Document("d0", "t", TEXT)], tok), doc_ids=["d0"], tokenizer=tok,
                 sampler=Sampler(model, pad_id=tok.pad_id), cfg=cfg, on_tokens=counted.append)
  assert sum(counted) == 2 * 2  # shard 0: two conversations
