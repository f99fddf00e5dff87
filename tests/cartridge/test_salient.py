"""cas.cartridge.salient with the default model's real tokenizer."""
import math

import pytest

from cas.cartridge.salient import idf_table, salient_ids, sentences, words
from cas.testing import real_tokenizer

FILLER = "The old town had a market and a church and a river that ran past the mill. "


def test_idf_counts_the_texts_that_hold_a_word():
  idf = idf_table(["the cat sat", "the dog sat", "the cat ran"])
  assert idf["the"] == 0.0 and math.isclose(idf["cat"], math.log(3 / 2)) and math.isclose(idf["dog"], math.log(3))
  assert "a" not in idf_table(["a b c"])  # words of fewer than 3 characters are not counted


def test_numbers_count_as_words_so_a_template_sentence_scores_by_its_value():
  assert words("Hemoglobin was 13.2 g/dL on 2024-03-15.") == ["hemoglobin", "was", "2024"]  # 3+ characters
  assert words("Hemoglobin was 13.2 g/dL on 2024-03-15.", numbers=True) == ["hemoglobin", "was", "13.2", "2024-03-15"]
  tok = real_tokenizer()
  template = "Hemoglobin was {} g/dL at the last visit."
  seen = "The patient was seen at the clinic today."  # in every text, as the template's words are
  docs = [FILLER + seen + " " + template.format(v) for v in ("13.2", "11.8", "9.4")]
  budget = len(tok.encode(" " + template.format("13.2"))) + 1  # room for one of the two short sentences
  plain = tok.decode(salient_ids(docs[0], budget, idf_table(docs), tok.encode))
  num = tok.decode(salient_ids(docs[0], budget, idf_table(docs, numbers=True), tok.encode, numbers=True))
  assert plain.strip() == seen  # mean IDF: every word is in every text, so the earliest sentence that fits
  assert "13.2" in num  # its value is in no other text


def test_salient_ids_keep_the_rare_sentence_wherever_it_stands_in_document_order():
  tok = real_tokenizer()
  fact = "The door code of the sapphire pavilion is 8549."
  doc = FILLER * 20 + fact + " " + FILLER * 5
  others = [FILLER * 3, FILLER * 2 + "The mill burned.", FILLER]
  idf = idf_table([doc] + others)
  budget = 64
  ids = salient_ids(doc, budget, idf, tok.encode)
  text = tok.decode(ids)
  assert len(ids) <= budget and fact in text
  assert fact not in tok.decode(tok.encode(doc)[:budget])  # the first tokens would have missed it
  kept = sentences(text)
  order = [sentences(doc).index(s) for s in kept]
  assert order == sorted(order) and len(kept) >= 2
  short = "A short note about the mill."
  assert salient_ids(short, budget, idf, tok.encode) == list(tok.encode(short))  # fits: unchanged
  one = "word " * 200  # one sentence longer than the budget: its first tokens
  assert salient_ids(one, budget, idf, tok.encode) == list(tok.encode(one))[:budget]


def test_salient_lead_keeps_the_opening_in_a_row_then_the_rare_sentence():
  tok = real_tokenizer()
  opening = "There were boats by the quay. The boats were there. "  # words in every text: the least salient
  fact = "The door code of the sapphire pavilion is 8549."
  doc = opening + FILLER * 20 + fact + " " + FILLER * 5
  idf = idf_table([doc, FILLER * 3 + opening, FILLER + opening, "Another book. " + opening])
  budget = 64
  plain, led = (tok.decode(salient_ids(doc, budget, idf, tok.encode, lead=x)) for x in (0.0, 0.5))
  assert fact in plain and fact in led
  assert led.startswith(opening.strip()) and not plain.startswith(opening.strip())  # opening kept first, in a row
  assert len(salient_ids(doc, budget, idf, tok.encode, lead=0.9)) <= budget
  for bad in (-0.1, 1.0):
    try:
      salient_ids(doc, budget, idf, tok.encode, lead=bad)
    except ValueError as e:
      assert "lead" in str(e)
    else:
      raise AssertionError(f"lead={bad} accepted")


def test_init_ids_header_is_the_icl_title_line_once():
  tok = real_tokenizer()
  from cas.cartridge.salient import header_ids, init_ids
  text = FILLER * 10 + "The door code of the sapphire pavilion is 8549."
  idf = idf_table([text, FILLER])
  head = header_ids("Harbour notes (part 2 of 3)", text, tok.encode)
  assert tok.decode(head) == "# Harbour notes (part 2 of 3)\n"
  assert header_ids("Harbour notes", "# Harbour notes\n\n" + text, tok.encode) == []  # the text opens with it
  assert header_ids("", text, tok.encode) == []
  doc = init_ids(text, "Harbour notes (part 2 of 3)", 48, tok.encode, header=True)
  assert doc[:len(head)] == head and doc[len(head):] == list(tok.encode(text))
  sal = init_ids(text, "Harbour notes (part 2 of 3)", 48, tok.encode, mode="salient", idf=idf, header=True)
  assert sal[:len(head)] == head and len(sal) <= 48 and "8549" in tok.decode(sal)
  assert init_ids(text, "t", 48, tok.encode) == list(tok.encode(text))  # no header: the text itself
  # salient, on a text that opens with its title: the title line stays first (once), whatever its words score
  opened = "# Harbour notes\n\n" + text
  sal2 = init_ids(opened, "Harbour notes", 48, tok.encode, mode="salient", idf=idf_table([opened, FILLER + "Harbour notes"]),
                  header=True)
  assert tok.decode(sal2).startswith("# Harbour notes\n") and tok.decode(sal2).count("Harbour notes") == 1


def test_salient_ids_take_another_salience_and_the_models_surprisal_scores_each_sentence():
  import numpy as np
  import pytest
  from cas.cartridge.salient import init_ids, sentence_surprisal
  from cas.testing import TINY_SMOL_VOCAB, tiny_model
  tok = real_tokenizer()
  text = "Alpha sentence here. Bravo sentence here. Charlie sentence here. " * 4
  last = lambda pieces: [float(i) for i in range(len(pieces))]  # later sentences score higher
  ids = salient_ids(text, 12, {}, tok.encode, scores=last)
  assert tok.decode(ids).strip().endswith("Charlie sentence here.") and "Alpha" not in tok.decode(ids)
  with pytest.raises(ValueError, match="surprisal"):
    init_ids(text, "t", 12, tok.encode, mode="surprisal")
  score = sentence_surprisal(tiny_model(seed=1, cfg=TINY_SMOL_VOCAB), tok.bos_id, window=16)
  pieces = [list(tok.encode(" " + s)) for s in sentences(text)]
  got = score(pieces)
  assert len(got) == len(pieces) and np.all(np.isfinite(got)) and min(got) > 0


def test_sentences_split_period_sentence_and_clause():
  text = ("Attending physician: Dr. Ravi Subramanian. He met Mr. J. R. Smith, e.g. at home; then left.\n"
          "See No. 5 now. He said no. The end.\nDr.\nNext line.")
  # "period" (the default: every run's init so far) cuts at every period, also after a title
  assert sentences(text)[:3] == ["Attending physician: Dr.", "Ravi Subramanian.", "He met Mr."]
  assert sentences(text, "sentence") == ["Attending physician: Dr. Ravi Subramanian.",
                                         "He met Mr. J. R. Smith, e.g. at home;", "then left.", "See No. 5 now.",
                                         "He said no.", "The end.", "Dr.", "Next line."]
  assert sentences(text, "clause")[:4] == ["Attending physician:", "Dr.", "Ravi Subramanian.", "He met Mr."]
  assert "Smith," in sentences(text, "clause") and "e.g." in sentences(text, "clause")
  with pytest.raises(ValueError, match="split='words'"):
    sentences(text, "words")


def test_salient_ids_split_decides_what_a_kept_piece_holds():
  """The same budget keeps the label with the name under split="sentence", the name alone under "period"."""
  tok = real_tokenizer()
  fact = "Attending physician: Dr. Quentin Abernathy-Volkov."
  doc = FILLER * 20 + fact + " " + FILLER * 5
  idf = idf_table([doc, FILLER * 3, FILLER + "Attending physician: Dr. Lee.", FILLER + "A physician came."])
  assert fact in tok.decode(salient_ids(doc, 32, idf, tok.encode, split="sentence"))
  name = len(tok.encode(" Quentin Abernathy-Volkov."))
  period = tok.decode(salient_ids(doc, name, idf, tok.encode))  # a budget of the name's tokens: the name alone
  assert "Quentin Abernathy-Volkov." in period and "physician" not in period
  assert "Quentin" not in tok.decode(salient_ids(doc, name, idf, tok.encode, split="sentence"))  # label + name do not fit
