"""Self-study in the "bare" prompt format (issue 26): the student's prompt is the chat template's user turn
without the default system turn SmolLM2's template inserts ("You are a helpful AI assistant named SmolLM...",
which would sit between the cartridge and the question); bot A and bot B, whose prompts carry a system
message, read exactly what they read in chat format, so the conversations and the teacher's top-k are the
chat run's; the manifest records the format and a resume in chat format is refused."""
import numpy as np
import pytest

from cas.data.types import Document
from cas.model.llama import build_model
from cas.model.sampler import Sampler
from cas.synth.format import SynthDataError, SynthDataset
from cas.synth.selfstudy import SynthConfig, synthesize
from cas.testing import TINY_SMOL_VOCAB, real_tokenizer

TEXT = ("The lighthouse of Varnholm was kept by Ines Marlow from 1911 to 1937. Its lamp burned whale oil "
        "until 1923, when a paraffin burner replaced it. ") * 5
CFG = SynthConfig(conversations_per_doc=4, shard_size=2, batch_size=2, min_chunk=24, max_chunk=48,
                  max_user_tokens=6, max_answer_tokens=8, top_k=5, seed=5, families=("quote", "question"))


def _run(tok, model, d):
  return synthesize(d, documents=[Document("d0", "t", TEXT)], tokenizer=tok, sampler=Sampler(model, pad_id=tok.pad_id),
                    cfg=CFG, model_fingerprint="tiny", model_source="tiny")


def test_bare_student_prompts_leave_out_the_default_system_turn_and_nothing_else(tmp_path):
  chat, bare = real_tokenizer(), real_tokenizer().with_prompt_format("bare")
  model = build_model(TINY_SMOL_VOCAB, seed=0)
  assert _run(bare, model, str(tmp_path / "bare"))["prompt_format"] == "bare"
  assert "prompt_format" not in _run(chat, model, str(tmp_path / "chat"))  # chat datasets keep their old header
  b = SynthDataset(str(tmp_path / "bare")).load_all()
  c = SynthDataset(str(tmp_path / "chat")).load_all()
  assert len(b) == len(c) == 4
  for x, y in zip(b, c):
    sb = chat.decode(list(x.prompt_ids), skip_special_tokens=False)
    sc = chat.decode(list(y.prompt_ids), skip_special_tokens=False)
    assert "system" in sc and "system" not in sb  # the default turn is gone from the student's prompt
    assert sb.startswith("<|im_start|>user\n") and sc.endswith(sb)  # and only it
    # the same conversation: bot A/B prompts hold a system message, which both formats render alike
    np.testing.assert_array_equal(x.answer_ids, y.answer_ids)
    np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
    np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-5)
  with pytest.raises(SynthDataError, match="prompt format 'bare'.*'chat'"):
    _run(chat, model, str(tmp_path / "bare"))  # resuming the bare dataset in chat format
