"""Evaluation engine: the prefix path equals putting the context in the prompt; answer checking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas.data.types import Document, Question
from cas.eval.methods import Evaluator, is_correct_short, markdown_table, normalize, run_method
from cas.eval.scoring import score_continuations
from cas.model.llama import build_model
from cas.model.sampler import Sampler
from cas.testing import TINY_SMOL_VOCAB, real_tokenizer

DOC = Document("d0", "Record", "Patient Ana Ruiz was born on March 3, 1961. Her physician is Dr. Omar Haddad.")
MC = Question("q1", "d0", "mc", "Who is Ana Ruiz's physician?", ["Dr. Omar Haddad", "Dr. Lee Chan", "Dr. Eva Berg"], answer_index=0)
SHORT = Question("q2", "d0", "short", "When was Ana Ruiz born?", answer="March 3, 1961", aliases=["1961-03-03"])


@pytest.fixture(scope="module")
def ev():
  tok = real_tokenizer()
  model = build_model(TINY_SMOL_VOCAB, seed=1)
  return Evaluator(model, tok, Sampler(model, pad_id=tok.pad_id), max_new_tokens=4)


def test_icl_prefix_scores_equal_full_prompt_scores(ev):
  """ICL puts the document's system message in a prefix KV; scoring options after that prefix must
  equal scoring them with the whole chat (system + question) as plain prompt tokens."""
  ctx = ev.icl([DOC])
  prompt = ev._prompt_ids(ctx, MC)
  full = ev.tok.apply_chat_template([{"role": "system", "content": ctx.system},
                                     {"role": "user", "content": "x"}], add_generation_prompt=True)
  conts = [ev.tok.encode(o) for o in MC.options]
  s_prefix, n1 = score_continuations(ev.model, ctx.prefix_kv, prompt, conts)
  sys_ids = full[:ctx.prefix_tokens]
  s_plain, n2 = score_continuations(ev.model, None, sys_ids + prompt, conts)
  np.testing.assert_allclose(s_prefix, s_plain, atol=2e-4)
  np.testing.assert_array_equal(n1, n2)
  assert ctx.prefix_tokens > 20 and ctx.cartridge_tokens == 0


def test_methods_report_tokens_bytes_and_table(ev):
  rows = []
  for name, ctx in [("no_context", ev.no_context()), ("icl", ev.icl([DOC]))]:
    rows.append(run_method(name, [MC, SHORT], lambda q, c=ctx: c, ev, progress=False))
  assert rows[1]["prompt_tokens"] > rows[0]["prompt_tokens"]  # the document is in the prompt
  assert rows[1]["kv_bytes"] > rows[0]["kv_bytes"]
  assert all(r["num_questions"] == 2 and 0 <= r["accuracy"] <= 1 for r in rows)
  assert all(r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1] for r in rows)
  k = jnp.zeros((TINY_SMOL_VOCAB.num_layers, 8, 2, 16))
  cart = run_method("cartridge", [MC], lambda q: ev.cartridge(k, k), ev, progress=False)
  per_tok = TINY_SMOL_VOCAB.kv_bytes_per_token(2)
  assert cart["kv_bytes"] == (cart["prompt_tokens"] + 8) * per_tok
  table = markdown_table(rows + [cart])
  assert table.count("\n") == 5 and "| icl |" in table


def test_short_answer_matching():
  assert is_correct_short("She was born on 3 March... no: March 3, 1961.", ["March 3, 1961"])
  assert is_correct_short("DOB 1961-03-03", ["March 3, 1961", "1961-03-03"])
  assert not is_correct_short("March 3, 1962", ["March 3, 1961"])
  assert normalize("HbA1c 7.9%.") == "hba1c 7.9%"


def test_the_distractor_share_of_composed_cartridges(ev):
  """Evaluator(attention_share=True): a context of composed cartridges with distractor slots gets each
  question's share of prefix attention on them; the shares of the sink, the own cartridge and the
  distractors add up to one; a context without distractors (or the flag off) gets none."""
  from cas.cartridge.cartridge import init_cartridge
  from cas.eval.scoring import prefix_attention_share
  tok = ev.tok
  carts = [init_cartridge(ev.model, tok.encode(t)[:12], 8, sink_ids=[1])
           for t in ("Patient Ana Ruiz was born on March 3, 1961 in Lyon.", "Dr. Lee Chan runs the night clinic in Oslo.",
                     "The ward on floor four holds twelve beds and a garden.")]
  on = Evaluator(ev.model, tok, max_new_tokens=4, attention_share=True)
  ctx = on.cartridges(carts, distractor=[True, False, True])
  assert ctx.distractor.tolist() == [False] + [True] * 7 + [False] * 7 + [True] * 7
  row = run_method("cas_composed@3", [MC], lambda q: ctx, on, progress=False)
  share = row["questions"][0]["distractor_share"]
  assert 0.0 < share < 1.0 and row["distractor_share"] == pytest.approx(share)
  prompt = on._prompt_ids(ctx, MC)
  masks = {"own": np.r_[[False] + [False] * 7 + [True] * 7 + [False] * 7], "sink": np.r_[[True] + [False] * 21]}
  parts = {n: prefix_attention_share(ev.model, ctx.prefix_kv, m, prompt, position_offset=ctx.position_offset)
           for n, m in masks.items()}
  assert parts["own"] > 0 and parts["sink"] > 0
  assert share + parts["own"] + parts["sink"] == pytest.approx(1.0, abs=1e-5)
  assert "distractor_share" not in run_method("x", [MC], lambda q: on.cartridges(carts, distractor=[False] * 3), on,
                                              progress=False)
  assert "distractor_share" not in run_method("x", [MC], lambda q: ev.cartridges(carts, distractor=[True, False, True]),
                                              ev, progress=False)
  with pytest.raises(ValueError, match="2 distractor flags for 3 cartridges"):
    on.cartridges(carts, distractor=[True, False])


def _reference_scores(model, prefix_kv, prompt, conts):
  """Each continuation scored alone from the model's full logits (no buckets, no window)."""
  from cas.model.llama import Prefix
  out = []
  for c in conts:
    seq = jnp.asarray([list(prompt) + list(c)], jnp.int32)
    p = 0 if prefix_kv is None else prefix_kv[0].shape[1]
    pre = None if prefix_kv is None else Prefix(prefix_kv[0][:, None], prefix_kv[1][:, None], jnp.ones((1, p), bool))
    logits, _ = model(seq, p + jnp.arange(seq.shape[1])[None], jnp.ones_like(seq), prefix=pre)
    lp = np.asarray(jax.nn.log_softmax(logits[0, :-1], axis=-1))
    first = max(len(prompt), 1)  # the sequence's first token has nothing before it
    out.append(sum(lp[j - 1, int(seq[0, j])] for j in range(first, seq.shape[1])))
  return np.asarray(out)


@pytest.mark.parametrize("prompt_len,cont_lens", [
    (20, (3, 9)),     # the window of 16 starts at the prompt's last token
    (115, (9, 2)),    # the window would pass T = 128: it is moved left
    (0, (5,)),        # no prompt: the first token is not scored
    (3, (70,)),       # the continuation fills most of the row: every position
])
def test_scores_read_only_the_continuation_window(ev, prompt_len, cont_lens):
  """score_continuations runs the LM head on a window that holds the continuations only: the same sums
  as every position's logits, with and without a prefix."""
  rng = np.random.default_rng(prompt_len)
  prompt = [int(t) for t in rng.integers(3, 4000, prompt_len)]
  conts = [[int(t) for t in rng.integers(3, 4000, n)] for n in cont_lens]
  k = jnp.asarray(rng.normal(size=(TINY_SMOL_VOCAB.num_layers, 7, TINY_SMOL_VOCAB.num_kv_heads,
                                   TINY_SMOL_VOCAB.head_dim)), jnp.float32)
  for prefix in (None, (k, 0.5 * k)):
    got, n = score_continuations(ev.model, prefix, prompt, conts)
    want = _reference_scores(ev.model, prefix, prompt, conts)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(n, [c - (1 if prompt_len == 0 else 0) for c in cont_lens])
