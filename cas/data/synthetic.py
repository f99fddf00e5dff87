"""Built-in synthetic collections of mutually confusable documents, with questions.

`generate_collection(num_docs, seed, kind="patients")` builds documents that all share the same
fields (patients: date of birth, attending physician, diagnosis, new medication and dose, allergy,
lab values, procedure, dates, follow-up clinic, ...) with values drawn from shared pools, written
as fluent narrative prose with filler sections (hospital course, social and family history) for
length. Every document gets, per field, one multiple-choice question (4 options; the 3
distractors are the values of the same field in OTHER documents of the collection, so a model
that has not read the document is at chance, 25%) and one short-answer question (with aliases).
Questions name the document's subject (a unique patient name / product name), so each is
answerable from exactly one document.

Determinism: everything is a function of (kind, seed, document index). Document i's facts and
text do not depend on `num_docs`, so a small collection is a prefix of a larger one with the same
seed (only MC distractors, which come from the other documents, differ).

Scale: `iter_collection` yields (document, questions) one at a time and `write_synthetic_collection`
streams them to disk; 2,000 documents x ~600 words (> 1M tokens) take a few seconds. Only the
small per-document fact dictionaries are held for the whole collection.

Kinds: "patients" (hospital discharge summaries), "products" (product specification sheets) and
"minutes" (minutes of one meeting of a named body per document: longer, 1,000-4,000 tokens, in
sections Attendance / Agenda / Discussion / Decisions / Action items / Next meeting). For
"minutes" every field also gets a question pair that names the meeting by one of its other unique
facts instead of the body (date, venue, budget or supplier; meta "refers": "content", the others
"title"); patients and products questions carry no "refers" and are unchanged by default.

Question options (issue 21; `iter_collection`): `question_refs` ("title", "content") adds to
patients and products, per field, an MC + short pair that refers to the document by content:
two to four derived facts (a decade, a season, a band, a body system, number words; see
"content refs" below) whose combination no other document of the collection has, qid
`{doc}/{field}/content/{mc|short}` as for minutes (the title questions keep `{doc}/{field}/{mc|short}`;
every question then carries meta "refers"). `pair_share` (e.g. 0.25) adds that share of
questions needing two documents (which of the two has the higher value / came first, the
difference or the sum of their values): `Question.doc_ids` holds both gold documents, meta
"docs": "pair", "op", qid `{doc}/pair-NN/{field}/{op}[/content]/{mc|short}`. Content questions and
pairs depend on the whole collection (uniqueness, partners), so they change with num_docs.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import math
import os
import random
from typing import Callable, Iterator

from absl import logging

from cas.data.types import (Collection, CollectionWriter, Document, Question,
                            approx_num_tokens)

GENERATOR_NAME = "cas.data.synthetic"
GENERATOR_VERSION = "1"
NUM_OPTIONS = 4

Facts = dict  # field key -> canonical value string (as it appears in the text), plus extras.


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  """One fact type: how to ask about it, how to sample a fresh value, its aliases."""
  key: str
  question: str  # Template with {subject}.
  # A fresh value from the shared pool (fallback distractor when other documents run out).
  sample: Callable[[random.Random], str]
  aliases: Callable[[str], list[str]] = lambda v: []


def _rng(*parts) -> random.Random:
  # random.Random(str) seeds from a SHA-512 of the string: stable across runs and platforms.
  return random.Random(":".join(str(p) for p in parts))


def _an(phrase: str) -> str:
  return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _fmt_date(d: datetime.date) -> str:
  return f"{d:%B} {d.day}, {d.year}"


def _date_aliases(v: str) -> list[str]:
  d = datetime.datetime.strptime(v, "%B %d, %Y").date()
  return [d.isoformat(), f"{d.day} {d:%B} {d.year}", f"{d:%m/%d/%Y}", f"{d:%b} {d.day}, {d.year}"]


def _random_date(rng: random.Random, start: datetime.date, end: datetime.date) -> datetime.date:
  return start + datetime.timedelta(days=rng.randrange((end - start).days + 1))


def _number_aliases(v: str) -> list[str]:
  """"7.9%" -> ["7.9", "7.9 %"]; "1.4 mg/dL" -> ["1.4", "1.4 mg/dl", "1.4mg/dL"]."""
  num, _, unit = v.partition(" ")
  if v.endswith("%"):
    return [v[:-1], v[:-1] + " %"]
  out = [num]
  if unit:
    out += [f"{num} {unit.lower()}", f"{num}{unit}"] if unit.lower() != unit else [f"{num}{unit}"]
  return out


def _doctor_aliases(v: str) -> list[str]:
  bare = v.removeprefix("Dr. ")
  return [bare, "Dr. " + bare.split()[-1], "Doctor " + bare]


def _words(text: str) -> int:
  return len(text.split())


# =============================================================================== patients

_FEMALE_FIRST = [
    "Helena", "Maria", "Aisha", "Priya", "Grace", "Olivia", "Nadia", "Ingrid", "Sofia", "Yuki",
    "Fatima", "Chloe", "Margaret", "Eleanor", "Rosa", "Amara", "Leila", "Hannah", "Beatrice",
    "Camille", "Daniela", "Esther", "Farah", "Gabriela", "Irene", "Joanna", "Katarina", "Lucia",
    "Mei", "Noor", "Paulina", "Ruth", "Selma", "Teresa", "Ursula", "Valentina", "Wanda", "Ximena",
    "Yasmin", "Zofia", "Agnes", "Brenda", "Carmen", "Delia", "Edith", "Flora", "Greta", "Hilda",
    "Isla", "June", "Keiko", "Lorna", "Miriam", "Nora", "Opal", "Petra", "Rhea", "Sandra",
]
_MALE_FIRST = [
    "Thomas", "Rahul", "Kwame", "Mateo", "Lars", "Hiroshi", "Omar", "Daniel", "Viktor", "Samuel",
    "Arjun", "Felix", "George", "Henrik", "Ivan", "Jamal", "Kenji", "Luis", "Marcus", "Nikolai",
    "Oscar", "Pedro", "Quentin", "Rafael", "Stefan", "Tobias", "Umar", "Vincent", "Walter",
    "Xavier", "Yusuf", "Zoltan", "Andre", "Bernard", "Carlos", "Dmitri", "Emil", "Francis",
    "Gustavo", "Harold", "Ibrahim", "Jonas", "Karl", "Leon", "Milan", "Nathan", "Otto", "Patrick",
    "Ruben", "Simon", "Theo", "Uriel", "Victor", "Wesley", "Aaron", "Boris", "Cyril", "Dennis",
]
_LAST = [
    "Vargas", "Okafor", "Lindqvist", "Nakamura", "Haddad", "Kowalski", "Brennan", "Castillo",
    "Dubois", "Eriksen", "Fontaine", "Gallagher", "Hoffmann", "Iyer", "Jankowski", "Kapoor",
    "Larsen", "Mbeki", "Novak", "Oyelaran", "Petrov", "Quiroga", "Rasmussen", "Sato", "Takahashi",
    "Uribe", "Vasquez", "Whitfield", "Yilmaz", "Zielinski", "Abernathy", "Bianchi", "Chowdhury",
    "Delgado", "Esposito", "Ferreira", "Grieve", "Holloway", "Ibarra", "Jensen", "Kaminski",
    "Lefebvre", "Moreau", "Nilsson", "Ortega", "Pellegrini", "Romano", "Schreiber", "Tanaka",
    "Umeh", "Valdez", "Weber", "Xu", "Young", "Zamora", "Andersson", "Baptiste", "Coleman",
    "Donnelly", "Engstrom", "Fitzgerald", "Gomez", "Hartmann", "Ishikawa", "Johansson", "Keller",
    "Lombardi", "Mahmoud", "Nguyen", "O'Sullivan", "Park", "Reyes", "Sorensen", "Thornton",
    "Underwood", "Villanueva", "Wojcik", "Adeyemi", "Bergstrom", "Cardenas", "Duarte", "Ekstrom",
    "Falk", "Gupta", "Horvath", "Ivanova", "Jovanovic", "Kruger", "Lindgren", "Marquez",
    "Navarro", "Olsen", "Pham", "Richter", "Salazar", "Toivonen", "Varga", "Wallace", "Yamamoto",
    "Zeller", "Acosta", "Brandt", "Cohen", "Dahl", "Eze", "Fischer", "Guerrero", "Hale",
    "Ionescu", "Jimenez", "Kovacs", "Lund", "Mendes", "Nowak", "Osei", "Pereira", "Rossi",
    "Sandoval", "Teixeira", "Volkov",
]
_DOCTORS = [
    "Dr. Helena Vargas", "Dr. Samuel Achebe", "Dr. Ingrid Solberg", "Dr. Rafael Montoya",
    "Dr. Amelia Hart", "Dr. Kenji Morimoto", "Dr. Lucia Benedetti", "Dr. Omar Farouk",
    "Dr. Charlotte Reinholt", "Dr. Vikram Desai", "Dr. Eleanor Whitcombe", "Dr. Tomasz Wierzbicki",
    "Dr. Nadia Karimi", "Dr. Julian Ashworth", "Dr. Beatriz Almeida", "Dr. Henrik Dahlberg",
    "Dr. Priya Raman", "Dr. Marcus Oyelowo", "Dr. Sofia Marchetti", "Dr. Daniel Kessler",
    "Dr. Aiko Fujimoto", "Dr. Gabriel Leclerc", "Dr. Miriam Goldfarb", "Dr. Stefan Albrecht",
    "Dr. Rosalind Pierce", "Dr. Tariq Nasser", "Dr. Yvonne Castellano", "Dr. Lukas Brenner",
    "Dr. Fiona McAllister", "Dr. Arturo Salgado", "Dr. Hannah Lindqvist", "Dr. Emeka Nwosu",
    "Dr. Clara Hoffstetter", "Dr. Ravi Subramanian", "Dr. Isabel Fonseca", "Dr. Anton Volkov",
    "Dr. Grace Okonkwo", "Dr. Matthias Kuhn", "Dr. Leila Haddadi", "Dr. Patrick Doherty",
    "Dr. Selin Aydin", "Dr. Jonas Vik", "Dr. Teresa Moreno", "Dr. Benedict Carrow",
    "Dr. Mei-Ling Zhou", "Dr. Oskar Lindahl", "Dr. Catalina Reyes", "Dr. William Ashby",
]
# (diagnosis, aliases, plausible procedures, plausible follow-up clinics). No diagnosis is a
# substring of another, so answers stay unambiguous.
_DIAGNOSES = [
    ("community-acquired pneumonia", ["CAP"], ["bronchoscopy", "thoracentesis"],
     ["pulmonology clinic", "infectious disease clinic"]),
    ("acute decompensated heart failure", ["ADHF"], ["transthoracic echocardiography",
                                                     "right heart catheterization"],
     ["heart failure clinic", "cardiology clinic"]),
    ("diabetic ketoacidosis", ["DKA"], ["central venous catheter placement"],
     ["endocrinology clinic", "diabetes education clinic"]),
    ("acute pancreatitis", [], ["ERCP with stent placement", "abdominal ultrasound"],
     ["gastroenterology clinic", "general surgery clinic"]),
    ("non-ST-elevation myocardial infarction", ["NSTEMI"], ["coronary angiography",
                                                            "percutaneous coronary intervention"],
     ["cardiology clinic", "cardiac rehabilitation clinic"]),
    ("pulmonary embolism", ["PE"], ["CT pulmonary angiography", "lower-extremity venous Doppler"],
     ["anticoagulation clinic", "pulmonology clinic"]),
    ("acute cholecystitis", [], ["laparoscopic cholecystectomy", "percutaneous cholecystostomy"],
     ["general surgery clinic"]),
    ("cellulitis of the left leg", ["left leg cellulitis"], ["ultrasound of the left leg",
                                                             "incision and drainage"],
     ["infectious disease clinic", "wound care clinic"]),
    ("upper gastrointestinal bleeding", ["upper GI bleed"], ["upper endoscopy"],
     ["gastroenterology clinic"]),
    ("pyelonephritis", [], ["renal ultrasound", "percutaneous nephrostomy"],
     ["urologic surgery clinic", "nephrology clinic"]),
    ("exacerbation of COPD", ["COPD exacerbation"], ["arterial blood gas sampling",
                                                     "pulmonary function testing"],
     ["pulmonology clinic"]),
    ("atrial fibrillation with rapid ventricular response", ["AF with RVR"],
     ["transesophageal echocardiography", "electrical cardioversion"],
     ["cardiology clinic", "anticoagulation clinic"]),
    ("acute ischemic stroke", ["ischemic stroke"], ["carotid ultrasound",
                                                    "MRI of the brain"],
     ["neurology clinic", "stroke prevention clinic"]),
    ("acute kidney injury", ["AKI"], ["renal ultrasound", "hemodialysis catheter placement"],
     ["nephrology clinic"]),
    ("small bowel obstruction", ["SBO"], ["nasogastric tube decompression",
                                          "exploratory laparotomy"],
     ["general surgery clinic"]),
    ("sepsis from a urinary source", ["urosepsis"], ["renal ultrasound", "cystoscopy"],
     ["urologic surgery clinic", "infectious disease clinic"]),
    ("hypertensive emergency", [], ["transthoracic echocardiography", "MRI of the brain"],
     ["cardiology clinic", "nephrology clinic"]),
    ("acute appendicitis", ["appendicitis"], ["laparoscopic appendectomy"],
     ["general surgery clinic"]),
    ("sigmoid diverticulitis", ["diverticulitis"], ["CT-guided abscess drainage", "colonoscopy"],
     ["gastroenterology clinic", "general surgery clinic"]),
    ("hyperosmolar hyperglycemic state", ["HHS"], ["central venous catheter placement"],
     ["endocrinology clinic", "diabetes education clinic"]),
    ("deep vein thrombosis", ["DVT"], ["lower-extremity venous Doppler",
                                       "inferior vena cava filter placement"],
     ["anticoagulation clinic", "hematology clinic"]),
    ("syncope due to complete heart block", ["complete heart block"],
     ["permanent pacemaker implantation"], ["cardiology clinic", "device clinic"]),
    ("alcoholic hepatitis", [], ["ultrasound-guided paracentesis", "transjugular liver biopsy"],
     ["hepatology clinic", "gastroenterology clinic"]),
    ("asthma exacerbation", [], ["pulmonary function testing", "arterial blood gas sampling"],
     ["pulmonology clinic", "allergy clinic"]),
    ("Clostridioides difficile colitis", ["C. difficile colitis"], ["flexible sigmoidoscopy"],
     ["infectious disease clinic", "gastroenterology clinic"]),
    ("fracture of the right hip", ["right hip fracture"], ["hip hemiarthroplasty",
                                                           "intramedullary nailing"],
     ["orthopedic clinic", "osteoporosis clinic"]),
    ("symptomatic hyponatremia", ["hyponatremia"], ["MRI of the brain", "renal ultrasound"],
     ["nephrology clinic", "endocrinology clinic"]),
    ("infective endocarditis", ["endocarditis"], ["transesophageal echocardiography",
                                                  "peripherally inserted central catheter "
                                                  "placement"],
     ["infectious disease clinic", "cardiology clinic"]),
    ("bacterial meningitis", ["meningitis"], ["lumbar puncture"],
     ["infectious disease clinic", "neurology clinic"]),
    ("acute gout flare", ["gout flare"], ["joint aspiration of the right knee"],
     ["rheumatology clinic"]),
]
# (drug, doses): new medications started during the admission.
_NEW_MEDS = [
    ("metoprolol", ["25 mg", "50 mg", "100 mg"]), ("apixaban", ["2.5 mg", "5 mg"]),
    ("atorvastatin", ["20 mg", "40 mg", "80 mg"]), ("lisinopril", ["5 mg", "10 mg", "20 mg"]),
    ("furosemide", ["20 mg", "40 mg", "80 mg"]), ("metformin", ["500 mg", "850 mg", "1000 mg"]),
    ("amlodipine", ["5 mg", "10 mg"]), ("spironolactone", ["12.5 mg", "25 mg"]),
    ("clopidogrel", ["75 mg"]), ("empagliflozin", ["10 mg", "25 mg"]),
    ("prednisone", ["20 mg", "40 mg"]), ("levetiracetam", ["500 mg", "750 mg"]),
    ("amiodarone", ["200 mg", "400 mg"]), ("rivaroxaban", ["15 mg", "20 mg"]),
    ("carvedilol", ["6.25 mg", "12.5 mg"]), ("pantoprazole", ["20 mg", "40 mg"]),
    ("sertraline", ["50 mg", "100 mg"]), ("allopurinol", ["100 mg", "300 mg"]),
    ("hydrochlorothiazide", ["12.5 mg", "25 mg"]), ("gabapentin", ["300 mg", "600 mg"]),
]
_HOME_MEDS = [
    "levothyroxine 75 mcg daily", "omeprazole 20 mg daily", "docusate 100 mg twice daily",
    "vitamin D3 1000 units daily", "montelukast 10 mg daily", "latanoprost eye drops nightly",
    "cetirizine 10 mg daily", "folic acid 1 mg daily", "sumatriptan 50 mg as needed",
    "calcium carbonate 500 mg twice daily", "loratadine 10 mg daily", "melatonin 3 mg at night",
    "ferrous sulfate 325 mg daily", "fluticasone nasal spray daily",
]
_ALLERGIES = [
    ("penicillin", "hives"), ("sulfonamide antibiotics", "a diffuse rash"), ("latex", "contact "
                                                                            "dermatitis"),
    ("codeine", "severe nausea"), ("iodinated contrast", "throat tightness"), ("peanuts",
                                                                               "anaphylaxis"),
    ("aspirin", "bronchospasm"), ("shellfish", "lip swelling"), ("morphine", "itching"),
    ("cephalexin", "hives"), ("ciprofloxacin", "tendon pain"), ("ibuprofen", "facial swelling"),
    ("bee stings", "anaphylaxis"), ("eggs", "abdominal cramps"), ("adhesive tape", "blistering"),
    ("vancomycin", "flushing"), ("tetracycline", "photosensitivity"), ("trimethoprim", "fever"),
]
_PROCEDURES = sorted({p for d in _DIAGNOSES for p in d[2]})
_CLINICS = sorted({c for d in _DIAGNOSES for c in d[3]})
_OCCUPATIONS = [
    "school librarian", "retired bus driver", "civil engineer", "pastry chef", "electrician",
    "dental hygienist", "accountant", "long-haul truck driver", "high school chemistry teacher",
    "retired postal worker", "software developer", "hairdresser", "warehouse supervisor",
    "veterinary technician", "architect", "retired firefighter", "bank teller", "carpenter",
    "flight attendant", "pharmacist", "farmer", "museum curator", "taxi dispatcher",
    "social worker", "piano tuner", "retired nurse", "insurance adjuster", "landscape gardener",
    "court stenographer", "marine biologist", "graphic designer", "plumber", "journalist",
    "restaurant owner", "physiotherapist", "mail carrier", "welder", "translator",
]
_HOSPITALS = [
    "St. Brigid Regional Medical Center", "Northgate University Hospital",
    "Lakeshore General Hospital", "Mercy Valley Hospital", "Riverside Community Hospital",
    "Harborview Memorial Hospital", "Cedar Ridge Medical Center", "Westbrook County Hospital",
]
_COMPLAINTS = {
    "default": ["progressive shortness of breath", "several days of fatigue and malaise",
                "worsening abdominal pain", "fever and chills", "chest discomfort",
                "dizziness and a fall at home", "nausea and poor oral intake",
                "confusion noticed by family members"],
}
_PMH = [
    "hypertension", "type 2 diabetes mellitus", "hyperlipidemia", "hypothyroidism",
    "osteoarthritis of both knees", "chronic kidney disease stage 3", "gastroesophageal reflux",
    "benign prostatic hyperplasia", "obstructive sleep apnea", "depression", "glaucoma",
    "migraine", "osteoporosis", "iron deficiency anemia", "seasonal allergic rhinitis",
]
_WARDS = ["internal medicine", "cardiology", "general surgery", "hospitalist", "step-down",
          "geriatrics"]
_SMOKING = ["has never smoked", "quit smoking ten years ago", "smokes a few cigarettes a day"]
_ALCOHOL = ["drinks alcohol rarely", "drinks socially", "drinks only on weekends",
            "does not drink alcohol"]
_HOBBIES = ["gardening", "crossword puzzles", "walking a dog", "choir singing", "fishing",
            "cooking"]
_RELATIVES = ["daughter", "son", "sister", "brother", "niece", "nephew", "cousin"]
_FAMILY_CONDITIONS = ["coronary artery disease", "breast cancer", "type 2 diabetes", "a stroke",
                      "colon cancer", "rheumatoid arthritis", "Parkinson disease", "glaucoma",
                      "hypertension", "dementia"]


def _sample_med(rng: random.Random) -> str:
  drug, doses = rng.choice(_NEW_MEDS)
  return f"{drug} {rng.choice(doses)}"


def _med_aliases(v: str) -> list[str]:
  drug, dose = v.split(" ", 1)
  compact = dose.replace(" ", "")
  return [f"{drug} {compact}", f"{dose} {drug}", f"{dose} of {drug}"]


def _sample_dob(rng: random.Random) -> str:
  return _fmt_date(_random_date(rng, datetime.date(1932, 1, 1), datetime.date(2000, 12, 31)))


def _sample_admission(rng: random.Random) -> str:
  return _fmt_date(_random_date(rng, datetime.date(2021, 1, 1), datetime.date(2024, 12, 31)))


def _sample_bp(rng: random.Random) -> str:
  return f"{rng.randint(100, 198)}/{rng.randint(52, 112)} mmHg"


_DIAG_ALIASES = {d[0]: d[1] for d in _DIAGNOSES}
_PATIENT_FIELDS = [
    FieldSpec("date_of_birth", "What is {subject}'s date of birth?", _sample_dob, _date_aliases),
    FieldSpec("attending", "Who was the attending physician during {subject}'s admission?",
              lambda r: r.choice(_DOCTORS), _doctor_aliases),
    FieldSpec("primary_diagnosis", "What was {subject}'s principal diagnosis on this admission?",
              lambda r: r.choice(_DIAGNOSES)[0], lambda v: list(_DIAG_ALIASES.get(v, []))),
    FieldSpec("new_medication", "Which new medication, with its dose, was {subject} started on "
              "for discharge?", _sample_med, _med_aliases),
    FieldSpec("allergy", "What is {subject} allergic to?", lambda r: r.choice(_ALLERGIES)[0],
              lambda v: [f"{v} allergy"]),
    FieldSpec("hba1c", "What was {subject}'s HbA1c on admission?",
              lambda r: f"{r.randint(52, 119) / 10:.1f}%", _number_aliases),
    FieldSpec("creatinine", "What was {subject}'s serum creatinine on admission?",
              lambda r: f"{r.randint(5, 38) / 10:.1f} mg/dL", _number_aliases),
    FieldSpec("hemoglobin", "What was {subject}'s hemoglobin on admission?",
              lambda r: f"{r.randint(72, 171) / 10:.1f} g/dL", _number_aliases),
    FieldSpec("blood_pressure", "What was {subject}'s blood pressure on arrival?", _sample_bp,
              lambda v: [v.split(" ")[0]]),
    FieldSpec("procedure", "Which procedure did {subject} undergo during the admission?",
              lambda r: r.choice(_PROCEDURES), lambda v: []),
    FieldSpec("admission_date", "On what date was {subject} admitted to the hospital?",
              _sample_admission, _date_aliases),
    FieldSpec("follow_up_clinic", "Which clinic will {subject} follow up with after discharge?",
              lambda r: r.choice(_CLINICS), lambda v: [v.removesuffix(" clinic")]),
    FieldSpec("primary_care_physician", "Who is {subject}'s primary care physician?",
              lambda r: r.choice(_DOCTORS), _doctor_aliases),
    FieldSpec("occupation", "What is {subject}'s occupation?", lambda r: r.choice(_OCCUPATIONS),
              lambda v: [v.removeprefix("retired ")] if v.startswith("retired ") else []),
]


def _patient_names(seed: int, num_docs: int) -> list[tuple[str, str]]:
  """Unique (name, sex) per document index: a seeded permutation of first x last names."""
  firsts = [(f, "F") for f in _FEMALE_FIRST] + [(m, "M") for m in _MALE_FIRST]
  capacity = len(firsts) * len(_LAST)
  if num_docs > capacity:
    raise ValueError(f"kind 'patients' supports at most {capacity} documents (unique names), "
                     f"asked for {num_docs}")
  order = list(range(capacity))
  _rng("patients", seed, "names").shuffle(order)
  out = []
  for k in order[:num_docs]:
    (first, sex), last = firsts[k // len(_LAST)], _LAST[k % len(_LAST)]
    out.append((f"{first} {last}", sex))
  return out


def _patient_facts(seed: int, index: int, name: str, sex: str) -> Facts:
  r = _rng("patients", seed, "facts", index)
  attending, pcp = r.sample(_DOCTORS, 2)
  diagnosis, _, procedures, clinics = r.choice(_DIAGNOSES)
  allergy, reaction = r.choice(_ALLERGIES)
  admit = _random_date(r, datetime.date(2021, 1, 1), datetime.date(2024, 12, 31))
  los = r.randint(2, 14)
  dob = _random_date(r, datetime.date(1932, 1, 1), datetime.date(2000, 12, 31))
  age = admit.year - dob.year - ((admit.month, admit.day) < (dob.month, dob.day))
  return {
      "name": name, "sex": sex, "mrn": f"{r.randint(10**7, 10**8 - 1)}",
      "date_of_birth": _fmt_date(dob), "age": age,
      "attending": attending, "primary_care_physician": pcp,
      "primary_diagnosis": diagnosis, "new_medication": _sample_med(r),
      "allergy": allergy, "allergy_reaction": reaction,
      "hba1c": f"{r.randint(52, 119) / 10:.1f}%",
      "creatinine": f"{r.randint(5, 38) / 10:.1f} mg/dL",
      "hemoglobin": f"{r.randint(72, 171) / 10:.1f} g/dL",
      "blood_pressure": _sample_bp(r), "procedure": r.choice(procedures),
      "admission_date": _fmt_date(admit),
      "discharge_date": _fmt_date(admit + datetime.timedelta(days=los)), "length_of_stay": los,
      "follow_up_clinic": r.choice(clinics),
      "follow_up_weeks": r.choice([1, 2, 3, 4, 6, 8]),
      "occupation": r.choice(_OCCUPATIONS), "hospital": r.choice(_HOSPITALS),
      "home_medications": r.sample(_HOME_MEDS, 2),
      "pmh": r.sample([c for c in _PMH if not (sex == "F" and "prostat" in c)], 3),
      "relative": r.choice(_RELATIVES), "living": r.choice(_LIVING),
  }


def _pron(sex: str) -> dict:
  return ({"he": "she", "his": "her", "him": "her", "He": "She", "His": "Her", "man": "woman"}
          if sex == "F" else
          {"he": "he", "his": "his", "him": "him", "He": "He", "His": "His", "man": "man"})


_LIVING = ["alone in a ground-floor apartment", "with family in a two-story house",
           "in an assisted-living residence", "with a roommate in a rented flat",
           "with a partner in a bungalow"]

# Daily notes: each carries a (day, clock time) stamp, so many of them never contradict each
# other. One-off notes (assessments done once per stay) appear at most once per document.
_DAILY_NOTES = [
    "At {time} on hospital day {day}, {first} was afebrile with a temperature of {temp} °C. "
    "Nursing notes describe {his} appetite as {appetite}, and {he} walked about {meters} meters "
    "in the corridor with {aid}. {His} oxygen saturation was {spo2}% on {o2}.",
    "At {time} on hospital day {day}, {first} reported {symptom}, which settled after {prn}. "
    "The covering resident examined {him} and found no new focal findings, and the plan was "
    "left unchanged. Fluid balance at that point was {balance} milliliters for the day.",
    "At {time} on hospital day {day}, the {consult} team reviewed {first}. They agreed with the "
    "current management, suggested {suggestion}, and asked to be called again if {trigger}.",
    "At {time} on hospital day {day}, {first}'s heart rate was {hr} beats per minute and the "
    "respiratory rate {rr} breaths per minute. Telemetry showed {telemetry}. {He} was {mood} "
    "and asked questions about going home, which were answered at the bedside.",
    "At {time} on hospital day {day}, a skin check was unremarkable apart from {skin}. {first} "
    "was repositioned, the pressure-injury risk score was {braden}, and compression stockings "
    "were {stockings}.",
]
_ONE_OFF_NOTES = [
    "Occupational therapy assessed {first} during the stay, looking at stairs, dressing and "
    "meal preparation. {He} needed {assist} with {task}. The therapist left written exercises "
    "and recommended {equipment} for the home.",
    "The ward pharmacist completed a medication reconciliation with {first} and {his} "
    "{relative}. Pill organizers were discussed, and {he} was able to repeat back the purpose "
    "of each tablet. A dietitian added {diet} to the meal plan.",
    "Case management met {first} to plan the discharge. {He} lives {living}, and {his} "
    "{relative} agreed to help with {help}. Transport home was arranged for the afternoon of "
    "discharge.",
    "Physical therapy saw {first} and recommended {pt}. A falls-risk screen was completed and "
    "the results were shared with {his} {relative}.",
]


def _clock(slot: int) -> str:
  """Distinct clock times for slots 0..1439 (coprime stride), starting at 06:00."""
  minutes = (360 + 97 * slot) % 1440
  return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _patient_note(r: random.Random, template: str, f: Facts, p: dict, day: int = 0,
                  time: str = "") -> str:
  """Fills one filler note with incidental details (never a questioned field)."""
  return template.format(
      day=day, time=time, first=f["name"].split()[0], temp=f"{r.randint(362, 378) / 10:.1f}",
      appetite=r.choice(["fair", "improving", "good", "poor but improving"]),
      meters=r.choice([20, 40, 60, 80, 100, 150]),
      aid=r.choice(["a rolling walker", "a cane", "standby assistance", "no walking aid"]),
      pt=r.choice(["daily gait training", "home exercises", "outpatient physical therapy",
                   "no further therapy"]),
      spo2=r.randint(91, 99),
      o2=r.choice(["room air", "2 liters of nasal oxygen", "1 liter of nasal oxygen"]),
      symptom=r.choice(["a mild headache", "difficulty sleeping", "loose stools", "a dry cough",
                        "back discomfort", "mild nausea"]),
      prn=r.choice(["acetaminophen", "ondansetron", "a warm blanket and reassurance",
                    "simethicone", "a lidocaine patch"]),
      balance=r.choice(["+350", "-420", "-780", "+120", "-1,150"]),
      consult=r.choice(["physical medicine", "palliative care", "nutrition", "social work",
                        "wound care", "psychiatry"]),
      suggestion=r.choice(["early mobilization", "a sleep hygiene plan", "a protein supplement",
                           "a follow-up phone call after discharge"]),
      trigger=r.choice(["symptoms worsened", "the family had questions",
                        "discharge was delayed"]),
      relative=f["relative"], living=f["living"], hr=r.randint(58, 104), rr=r.randint(14, 22),
      telemetry=r.choice(["sinus rhythm", "occasional premature beats", "no arrhythmia"]),
      mood=r.choice(["calm", "cheerful", "tired but comfortable", "anxious about the results"]),
      assist=r.choice(["minimal assistance", "supervision", "no assistance"]),
      task=r.choice(["putting on socks", "getting out of a low chair", "carrying a tray"]),
      equipment=r.choice(["a shower chair", "grab bars", "a raised toilet seat", "a reacher"]),
      diet=r.choice(["a low-sodium option", "an oral nutrition supplement",
                     "a carbohydrate-consistent menu", "extra fiber"]),
      skin=r.choice(["mild dryness of the heels", "a small bruise on the forearm",
                     "redness at an old IV site"]),
      braden=r.randint(14, 21), stockings=r.choice(["continued", "removed", "refitted"]),
      help=r.choice(["groceries", "medication reminders", "transport to appointments"]),
      **p)


def _patient_fillers(r: random.Random, f: Facts, p: dict, num: int | None,
                     words: int | None) -> list[str]:
  """`num` filler notes (or as many as needed to reach `words`), in chronological order.

  The one-off notes come first (shuffled), then daily notes stamped with distinct
  (hospital day, time) pairs, sorted by day and time.
  """
  one_offs = r.sample(_ONE_OFF_NOTES, len(_ONE_OFF_NOTES))
  out, total, k = [], 0, 0
  daily: list[tuple[int, int, str]] = []
  los = f["length_of_stay"]
  while (num is not None and k < num) or (num is None and total < (words or 0)):
    if k % 2 == 1 and one_offs:
      text = _patient_note(r, one_offs.pop(), f, p)
      out.append(text)
    else:
      j = len(daily)
      day, slot = j % los + 1, j // los
      minutes = (360 + 97 * slot) % 1440
      text = _patient_note(r, r.choice(_DAILY_NOTES), f, p, day, _clock(slot))
      daily.append((day, minutes, text))
    total += _words(text)
    k += 1
  return out + [t for _, _, t in sorted(daily, key=lambda x: x[:2])]


def _render_patient(f: Facts, r: random.Random, words_per_doc: int | None) -> tuple[str, str]:
  p = _pron(f["sex"])
  name, first = f["name"], f["name"].split()[0]
  last = f["name"].split()[-1]
  title_name = ("Ms. " if f["sex"] == "F" else "Mr. ") + last
  complaint = r.choice(_COMPLAINTS["default"])
  pmh = f["pmh"]
  home = f["home_medications"]
  sex_word = "woman" if f["sex"] == "F" else "man"
  title = f"Discharge Summary: {name}"

  header = (
      f"# Discharge Summary: {name}\n\n"
      f"{f['hospital']}. Patient: {name}. Medical record number {f['mrn']}. Date of birth: "
      f"{f['date_of_birth']}. Admitted on {f['admission_date']} and discharged on "
      f"{f['discharge_date']}. Attending physician: {f['attending']}.")
  hpi = (
      "## History of Present Illness\n\n"
      f"{name} is a {f['age']}-year-old {sex_word} who came to the emergency department of "
      f"{f['hospital']} on {f['admission_date']} with {complaint}. "
      + r.choice([
          f"{p['He']} had felt unwell for about {r.randint(2, 9)} days before deciding to seek "
          f"care, and {p['his']} {f['relative']} drove {p['him']} in. ",
          "The symptoms began gradually over the preceding week and were worse at night. ",
          f"{p['He']} first called {p['his']} primary care office, where the nurse advised "
          "an emergency assessment. "])
      + f"On arrival {p['his']} blood pressure was {f['blood_pressure']}, the heart rate was "
      f"{r.randint(62, 124)} beats per minute, and the temperature was "
      f"{r.randint(362, 391) / 10:.1f} °C. After initial assessment and imaging, {title_name} was "
      f"admitted with a diagnosis of {f['primary_diagnosis']}.")
  history = (
      "## Past Medical History\n\n"
      f"{p['His']} history includes {pmh[0]}, {pmh[1]} and {pmh[2]}. {p['His']} primary care "
      f"physician is {f['primary_care_physician']}, who has followed {p['him']} for "
      f"{r.randint(2, 25)} years. Before admission {p['he']} took {home[0]} and {home[1]}.\n\n"
      "## Allergies\n\n"
      f"{first} is allergic to {f['allergy']}; a previous exposure caused "
      f"{f['allergy_reaction']}. The allergy band was checked on admission.")
  labs = (
      "## Laboratory Results\n\n"
      f"Admission blood tests showed a hemoglobin of {f['hemoglobin']}, a serum creatinine of "
      f"{f['creatinine']} and an HbA1c of {f['hba1c']}. The sodium was {r.randint(128, 145)} "
      f"mmol/L, the potassium {r.randint(32, 54) / 10:.1f} mmol/L and the white cell count "
      f"{r.randint(40, 190) / 10:.1f} x10^9/L. "
      + r.choice(["Blood cultures were drawn before antibiotics were given.",
                  "A urinalysis was unremarkable.",
                  "A chest radiograph was obtained in the emergency department."]))
  course_head = (
      "## Hospital Course\n\n"
      f"{title_name} was admitted to the {r.choice(_WARDS)} service under the care of "
      f"{f['attending']}. The diagnosis of {f['primary_diagnosis']} was managed according to "
      f"current guidelines. On hospital day {r.randint(1, max(1, f['length_of_stay'] - 1))} "
      f"{p['he']} underwent {f['procedure']}, which {p['he']} tolerated without complications. "
      f"{p['His']} condition improved steadily over a stay of {f['length_of_stay']} days.")
  job = f["occupation"]
  social = (
      "## Social History\n\n"
      + (f"{first} is {_an(job)}" if job.startswith("retired") else
         f"{first} works as {_an(job)}")
      + f" and lives {f['living']}. "
      f"{p['He']} {r.choice(_SMOKING)} and {r.choice(_ALCOHOL)}. "
      f"{p['He']} enjoys {r.choice(_HOBBIES)}.")
  family = (
      "## Family History\n\n"
      f"{p['His']} {r.choice(['mother', 'father'])} had "
      f"{r.choice(_FAMILY_CONDITIONS)} and a {r.choice(['brother', 'sister'])} has "
      f"{r.choice(_FAMILY_CONDITIONS)}. There is no known family history of bleeding disorders.")
  discharge = (
      "## Discharge Medications\n\n"
      f"During this admission {first} was started on {f['new_medication']} once daily, which "
      f"is a new medication. {p['He']} will continue {home[0]} and {home[1]} as before. The "
      f"changes were explained to {p['him']}, and a printed list was provided.\n\n"
      "## Follow-up\n\n"
      f"{first} will be seen in the {f['follow_up_clinic']} in {f['follow_up_weeks']} "
      f"week{'s' if f['follow_up_weeks'] > 1 else ''} and should see {p['his']} primary care "
      f"physician, {f['primary_care_physician']}, within two weeks. {p['He']} was advised to "
      "return to the emergency department for any worsening symptoms.")

  fixed = [header, hpi, history, labs, course_head, social, family, discharge]
  if words_per_doc is None:
    fillers = _patient_fillers(r, f, p, num=r.randint(2, 4), words=None)
  else:
    fillers = _patient_fillers(r, f, p, num=None,
                               words=words_per_doc - sum(_words(x) for x in fixed))
  course = "\n\n".join([course_head] + fillers)
  text = "\n\n".join([header, hpi, history, labs, course, social, family, discharge]) + "\n"
  return title, text


# =============================================================================== products

_BRANDS = ["Aurelis", "Korvan", "Nimbra", "Trellix", "Vantor", "Quillon", "Ostrava", "Lumeo",
           "Brightwell", "Caldera", "Zephyrine", "Halcyon", "Merida", "Orbis", "Pallas",
           "Sundial", "Tessaract", "Verdant", "Wyvern", "Yarrow"]
_PRODUCT_TYPES = ["portable speaker", "cordless drill", "robot vacuum", "e-reader",
                  "noise-cancelling headphones", "camping lantern", "handheld vacuum",
                  "electric toothbrush", "action camera", "smartwatch", "bike light",
                  "portable projector"]
_MODEL_WORDS = ["Arc", "Nova", "Crest", "Pulse", "Drift", "Echo", "Flux", "Glide", "Halo",
                "Ion", "Jet", "Kite", "Loom", "Mesa", "Nest", "Orbit", "Prism", "Quartz", "Ridge",
                "Sage", "Tide", "Umbra", "Vale", "Wave"]
_COUNTRIES = ["Portugal", "Vietnam", "Mexico", "Poland", "Malaysia", "Czech Republic", "Taiwan",
              "Turkey", "Estonia", "Thailand", "Slovenia", "Tunisia"]
_MATERIALS = ["anodized aluminum", "recycled polycarbonate", "brushed stainless steel",
              "bamboo composite", "glass-filled nylon", "powder-coated steel", "ABS plastic",
              "magnesium alloy"]
_CERTS = ["UL 62368-1", "IEC 60335-1", "Energy Star 8.0", "IP67", "IP54", "EN 55032 Class B",
          "FCC Part 15B", "RoHS 3", "TCO Certified 9"]
_SUPPORT = ["Harbor Street", "Mill Lane", "Quarry Road", "Orchard Way", "Station Avenue",
            "Canal Walk"]


def _sample_price(r: random.Random) -> str:
  return f"${r.randint(19, 899)}.{r.choice(['00', '49', '95', '99'])}"


def _sample_release(r: random.Random) -> str:
  return _fmt_date(_random_date(r, datetime.date(2018, 1, 1), datetime.date(2025, 6, 30)))


_PRODUCT_FIELDS = [
    FieldSpec("manufacturer", "Which company manufactures the {subject}?",
              lambda r: r.choice(_BRANDS) + " " + r.choice(["Labs", "Industries", "GmbH",
                                                           "Works", "Electronics"]),
              lambda v: []),
    FieldSpec("price", "What is the list price of the {subject}?", _sample_price,
              lambda v: [v.removeprefix("$"), v.removesuffix(".00")] if v.endswith(".00")
              else [v.removeprefix("$")]),
    FieldSpec("weight", "How much does the {subject} weigh?",
              lambda r: f"{r.randint(2, 49) / 10:.1f} kg", _number_aliases),
    FieldSpec("battery_life", "What battery life is specified for the {subject}?",
              lambda r: f"{r.randint(10, 48)} hours", lambda v: [v.replace(" hours", " h"),
                                                                  v.split(" ")[0]]),
    FieldSpec("warranty", "How long is the warranty on the {subject}?",
              lambda r: f"{r.randint(2, 7)} years" if r.random() < .7 else
              f"{r.choice([6, 18, 30])} months", lambda v: []),
    FieldSpec("release_date", "When was the {subject} released?", _sample_release,
              _date_aliases),
    FieldSpec("country_of_manufacture", "In which country is the {subject} manufactured?",
              lambda r: r.choice(_COUNTRIES), lambda v: []),
    FieldSpec("housing_material", "What is the housing of the {subject} made of?",
              lambda r: r.choice(_MATERIALS), lambda v: []),
    FieldSpec("power_rating", "What is the rated power of the {subject}?",
              lambda r: f"{r.randint(12, 99)} W", lambda v: [v.replace(" ", ""),
                                                              v.replace(" W", " watts")]),
    FieldSpec("certification", "Which certification does the {subject} carry?",
              lambda r: r.choice(_CERTS), lambda v: []),
    FieldSpec("operating_temperature", "What is the maximum operating temperature of the "
              "{subject}?", lambda r: f"{r.randint(30, 65)} °C",
              lambda v: [v.replace(" °C", "°C"), v.replace(" °C", " degrees Celsius")]),
    FieldSpec("product_manager", "Who is the product manager for the {subject}?",
              lambda r: r.choice(_FEMALE_FIRST + _MALE_FIRST) + " " + r.choice(_LAST),
              lambda v: [v.split(" ")[-1]]),
]


def _product_names(seed: int, num_docs: int) -> list[tuple[str, str]]:
  capacity = len(_MODEL_WORDS) * 90 * len(_PRODUCT_TYPES)
  if num_docs > capacity:
    raise ValueError(f"kind 'products' supports at most {capacity} documents, asked {num_docs}")
  order = list(range(capacity))
  _rng("products", seed, "names").shuffle(order)
  out = []
  for k in order[:num_docs]:
    word = _MODEL_WORDS[k % len(_MODEL_WORDS)]
    k //= len(_MODEL_WORDS)
    number = 10 + (k % 90)
    ptype = _PRODUCT_TYPES[k // 90]
    out.append((f"{word} {number * 10}", ptype))
  return out


def _product_facts(seed: int, index: int, model: str, ptype: str) -> Facts:
  r = _rng("products", seed, "facts", index)
  facts = {"model": model, "product_type": ptype, "name": f"{model} {ptype}"}
  for spec in _PRODUCT_FIELDS:
    facts[spec.key] = spec.sample(r)
  facts["sku"] = f"{r.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{r.randint(1000, 9999)}-{r.randint(10, 99)}"
  facts["support_street"] = r.choice(_SUPPORT)
  return facts


_PRODUCT_ONE_OFF = [
    "Packaging and logistics: the retail box measures {bx} by {by} by {bz} centimeters and "
    "ships {per} units to a carton. Cartons are stacked {layers} layers high on a standard "
    "pallet. The box is printed with soy-based inks on {paper} cardboard.",
    "Care and maintenance: wipe the exterior with a {cloth} and avoid {avoid}. Store the "
    "unit in a dry place and check the {part} every {months} months. Replacement {part}s are "
    "sold separately through authorized dealers.",
    "Accessibility and controls: the {name} offers {controls}, {contrast}-contrast display "
    "mode and audible confirmation tones that can be set to {tones} volume levels. The quick "
    "start guide is available in {langs} languages.",
]
# Numbered notes ({k} is unique within a document), so repeating them never contradicts.
_PRODUCT_NUMBERED = [
    "Field note {k}: during a pilot of {weeks} weeks with {customers} customers, reviewers praised "
    "the {praise} of the {name} and asked for {ask}. Firmware update {fw} addressed {issue} and "
    "was rolled out over the air.",
    "Test report {k}: in a {hours}-hour endurance test at {temp} °C ambient, the unit "
    "completed {cycles} duty cycles without faults. Surface temperature peaked {rise} degrees "
    "above ambient, and acoustic noise stayed below {db} dB(A) at one meter.",
    "Customer review {k}: a buyer from {city} gave the {name} {stars} out of 5 stars, noting "
    "the {praise} but wishing for {ask}. The support team replied within {reply} hours.",
]
_CITIES = ["Lisbon", "Osaka", "Denver", "Gdansk", "Nairobi", "Montreal", "Perth", "Tallinn",
           "Valparaiso", "Leeds"]


def _product_note(r: random.Random, template: str, f: Facts, k: int = 0) -> str:
  return template.format(
      k=k, name=f["name"], weeks=r.randint(2, 12), customers=r.randint(20, 400),
      praise=r.choice(["build quality", "quiet operation", "simple setup", "compact size"]),
      ask=r.choice(["a longer cable", "more color options", "a carrying case",
                    "app integration"]),
      fw=f"{r.randint(1, 4)}.{r.randint(0, 9)}.{r.randint(0, 20)}",
      issue=r.choice(["a rare startup delay", "an indicator-light glitch",
                      "a pairing timeout"]),
      bx=r.randint(12, 70), by=r.randint(10, 60), bz=r.randint(5, 40), per=r.choice([2, 4, 6, 8]),
      layers=r.randint(3, 7), paper=r.choice(["recycled", "FSC-certified", "unbleached"]),
      cloth=r.choice(["soft dry cloth", "slightly damp microfiber cloth"]),
      avoid=r.choice(["solvent cleaners", "abrasive pads", "spraying liquid directly"]),
      part=r.choice(["filter", "seal", "brush", "gasket"]), months=r.choice([3, 6, 12]),
      controls=r.choice(["tactile buttons", "a rotary dial", "capacitive touch keys"]),
      contrast=r.choice(["a high", "an enhanced"]), tones=r.randint(2, 5), langs=r.randint(6, 24),
      hours=r.choice([100, 250, 500, 1000]), temp=r.randint(20, 35),
      cycles=r.randint(500, 20000), rise=r.randint(4, 22), db=r.randint(28, 62),
      city=r.choice(_CITIES), stars=r.randint(2, 5), reply=r.randint(2, 72))


def _product_fillers(r: random.Random, f: Facts, num: int | None, words: int | None) -> list[str]:
  one_offs = r.sample(_PRODUCT_ONE_OFF, len(_PRODUCT_ONE_OFF))
  out, total, k = [], 0, 0
  while (num is not None and len(out) < num) or (num is None and total < (words or 0)):
    if one_offs and r.random() < 0.5:
      out.append(_product_note(r, one_offs.pop(), f))
    else:
      k += 1
      out.append(_product_note(r, r.choice(_PRODUCT_NUMBERED), f, k))
    total += _words(out[-1])
  return out


def _render_product(f: Facts, r: random.Random, words_per_doc: int | None) -> tuple[str, str]:
  name = f["name"]
  title = f"Product Specification: {name}"
  intro = (
      f"# Product Specification: {name}\n\n"
      f"The {name} (SKU {f['sku']}) is manufactured by {f['manufacturer']} and was released on "
      f"{f['release_date']} at a list price of {f['price']}. It is assembled in "
      f"{f['country_of_manufacture']}. The product manager responsible for the line is "
      f"{f['product_manager']}.")
  specs = (
      "## Technical Data\n\n"
      f"The {name} weighs {f['weight']} and its housing is made of {f['housing_material']}. "
      f"Rated power is {f['power_rating']}, and on a full charge the battery lasts "
      f"{f['battery_life']} under typical use. The maximum operating temperature is "
      f"{f['operating_temperature']}. The unit carries the {f['certification']} certification.")
  warranty = (
      "## Warranty and Support\n\n"
      f"{f['manufacturer']} provides a warranty of {f['warranty']} from the date of purchase. "
      f"Repairs are handled by the service center on {f['support_street']}, and customers "
      "should keep the original receipt.")
  fixed = [intro, specs, warranty]
  if words_per_doc is None:
    fillers = _product_fillers(r, f, num=r.randint(3, 5), words=None)
  else:
    fillers = _product_fillers(r, f, num=None,
                               words=words_per_doc - sum(_words(x) for x in fixed))
  notes = ("## Notes\n\n" + "\n\n".join(fillers)) if fillers else ""
  text = "\n\n".join([intro, specs] + ([notes] if notes else []) + [warranty]) + "\n"
  return title, text


# =============================================================================== minutes
#
# Minutes of one meeting of a distinct named body per document: a title and the sections
# Attendance, Agenda, Discussion (several items), Decisions, Action items and Next meeting;
# 1,000-4,000 approx tokens (a per-document target drawn from the seed). The body's name, the
# meeting date, the venue, the budget approved and the supplier chosen are unique in the
# collection by construction (seeded permutations, like the patient names), so each of the last
# four identifies the document without naming the body: every field gets, besides the questions
# naming the body (meta.refers "title"), a pair that refers to the meeting by one of them
# (meta.refers "content", meta.ref_field the fact used).

_MIN_PLACES = [
    "Eastfield", "Westmoor", "Kingsbridge", "Ravensford", "Oakhurst", "Brackenfield",
    "Thornbury", "Fallowmere", "Greystone", "Hollinwood", "Larkhill", "Marshgate", "Netherby",
    "Pennington", "Rookwood", "Saltcote", "Tidewell", "Upton Marsh", "Wickham", "Yarrowdale",
    "Alderley", "Beckford", "Coldharbour", "Dunmore", "Elmstead", "Foxley", "Glenholme",
    "Hatherley", "Ivybridge", "Lowther", "Merrow", "Norbury", "Ormsby", "Pendle", "Redbank",
    "Stanwick", "Thistleton", "Underhill", "Westerleigh", "Amberley", "Birchfield", "Crowmarsh",
    "Dovercourt", "Eddington", "Fernhurst", "Gorsey Bank", "Heathcote", "Inglewood", "Kirkby Lane",
    "Lindenholt", "Moorside", "Newlyn Quay", "Orchard Vale", "Priory Green", "Southmead",
    "Ashcombe", "Burnside", "Chalkwell", "Deepdale", "Evenlode",
]
_MIN_FOCUS = [
    "Allotment Society", "Lighting Committee", "Bridge Trust", "Burial Board",
    "Carnival Committee", "Choral Society", "Civic Society", "Community Orchard Group",
    "Cricket Club Committee", "Cycle Path Group", "Drainage Board", "Film Society",
    "Flood Action Group", "Footpaths Committee", "Gardening Club", "Harbour Commission",
    "Heritage Trust", "History Society", "Lifeboat Guild", "Market Committee",
    "Model Railway Club", "Neighbourhood Watch Committee", "Playground Committee",
    "Pond Restoration Group", "Recreation Ground Trust", "Rowing Club Committee",
    "Sailing Club Committee", "Swimming Pool Trust", "Tennis Club Committee", "Theatre Guild",
    "Tree Wardens' Group", "Twinning Association", "Village Hall Committee",
    "Walking Festival Committee", "Wildlife Group", "Youth Club Committee", "Bowls Club Committee",
    "Beekeepers' Association", "Chess Club Committee", "Road Safety Committee",
]
_MIN_VENUE_NAMES = [
    "Copperbeech", "Lantern", "Wheatsheaf", "Kingfisher", "Mayfield", "Bellwether", "Blackthorn",
    "Bramble", "Candlewick", "Cloverleaf", "Cobblestone", "Dovecote", "Elderflower", "Fieldfare",
    "Foxglove", "Goldcrest", "Hawthorn", "Heronsgate", "Hollyhock", "Kestrel", "Lavender",
    "Lindenbrook", "Marigold", "Meadowsweet", "Nightingale", "Oakapple", "Pelican", "Primrose",
    "Quayside", "Rosemary", "Saffron", "Skylark", "Sorrel", "Starling", "Sycamore", "Teasel",
    "Thistledown", "Wagtail", "Whitebeam", "Willowherb", "Woodbine", "Yellowhammer", "Bluebell",
    "Chestnut", "Damson", "Greenfinch", "Harebell", "Mulberry", "Nuthatch", "Swallowtail",
]
_MIN_VENUE_TYPES = [
    "Pavilion", "Reading Room", "Church Hall", "Scout Hut", "Institute", "Community Centre",
    "Memorial Hall", "Coach House", "Boathouse", "Library", "Chapel", "Tithe Barn", "Guildhall",
    "Corn Exchange", "Assembly Rooms", "Lodge", "Clubhouse", "Orangery", "Mission Room",
    "Drill Hall", "Sports Centre", "Youth Centre", "Arts Centre", "Meeting House", "Old School",
    "Gatehouse", "Court Room", "Mechanics' Institute", "Boat Shed", "Town Hall Annexe",
    "Council Chamber", "Museum", "Tea Rooms", "Heritage Centre", "Fire Station Hall",
    "Railway Rooms", "Market Hall", "Parish Rooms", "Village Hall", "Studio", "Function Room",
    "Conservatory", "Long Gallery", "Tower Room", "Cloister Room", "Malthouse", "Granary",
    "Signal Box",
]
# Supplier trade -> projects it can carry out (the main motion's project matches the supplier).
_MIN_TRADES = {
    "Glazing": ["replacement windows for the main room", "secondary glazing for the side room"],
    "Roofing": ["repairs to the storage shed roof", "new guttering along the north wall"],
    "Electrical": ["rewiring of the kitchen", "new emergency lighting"],
    "Lighting": ["LED lamps along the promenade", "floodlights for the car park"],
    "Joinery": ["six new oak benches", "a replacement front door"],
    "Fencing": ["a boundary fence along the lane", "new gates for the south entrance"],
    "Paving": ["resurfacing of the car park", "a new accessible path"],
    "Signs": ["new interpretation boards", "replacement direction signs"],
    "Landscapes": ["replanting of the memorial garden", "a wildflower meadow by the pond"],
    "Plumbing": ["replacement toilets", "a new boiler"],
    "Printing": ["the annual programme booklet", "posters and leaflets for the summer fair"],
    "Ironworks": ["restoration of the Victorian railings", "a wrought-iron archway"],
    "Stonemasons": ["repointing of the war memorial", "repairs to the boundary wall"],
    "Tree Surgery": ["felling of the diseased ash trees", "crown reduction of the lime trees"],
    "Decorators": ["redecoration of the entrance hall", "repainting of the window frames"],
    "Audio Visual": ["a hearing loop and sound system", "a projector and screen"],
    "Web Design": ["a new website with online booking", "a members' newsletter platform"],
    "Marquees": ["marquee hire for the summer fair", "a covered stage for the open day"],
    "Builders": ["an extension to the equipment store", "a ramp at the side entrance"],
    "Security": ["CCTV cameras at the entrance", "an intruder alarm for the store"],
}
_MIN_TRADE_NAMES = sorted(_MIN_TRADES)
_MIN_ACTIONS = [
    "write to the county council about the blocked drainage ditch",
    "obtain a quotation for the insurance renewal", "update the membership register",
    "draft a letter of thanks to the volunteers", "arrange a site visit with the contractor",
    "prepare a risk assessment for the open day", "check the fire extinguishers",
    "circulate the revised constitution", "book the hall for the annual general meeting",
    "contact the local newspaper about the appeal", "order new keys for the store room",
    "apply for a community grant from the district council",
    "survey members about meeting times", "audit the inventory of equipment",
    "update the safeguarding policy", "organise a litter pick along the river path",
    "set up a shared calendar for bookings", "collect the outstanding subscriptions",
    "prepare the annual accounts for independent examination",
    "photograph the site before work starts", "invite the police liaison officer to a meeting",
    "draft a press release about the project", "prepare a volunteer rota for the summer",
    "negotiate a discount on the hall hire", "renew the domain name of the website",
    "arrange the first aid course for volunteers", "compile a list of local sponsors",
    "measure the noticeboard for a new cover", "ask the landowner about access on open days",
    "review the lost property box",
]
_MIN_ROLES = ["treasurer", "secretary", "membership secretary", "vice-chair"]
_MIN_AFFILIATIONS = [
    "from the county archaeology service", "of the regional wildlife trust",
    "from the district council's planning team", "of the county records office",
    "from the local fire and rescue service", "of the rivers authority",
    "from the community energy cooperative", "of the county museum",
    "from the rural transport partnership", "of the national footpaths society",
]
_MIN_TALKS = [
    "the history of the old market charter", "managing hedgerows for nesting birds",
    "how to apply for heritage lottery funding", "flood resilience for small buildings",
    "the restoration of a nearby windmill", "recruiting younger volunteers",
    "solar panels on community buildings", "recording oral histories",
    "safe access for wheelchair users", "the decline of local bee populations",
]


_MIN_QUOTE_DIFFS = (
    ["the length of the guarantee", "the start date offered", "the materials proposed",
     "the payment terms"],
    ["the amount of site clearance included", "whether VAT was included",
     "the need for a site survey", "the disposal of waste"])
_MIN_QUOTE_ASKS = ["whether the work could be done in stages",
                   "how the work would affect bookings", "whether references had been taken up",
                   "who would supervise the contractor"]
_MIN_TALK_COVERED = ["recent examples from the region", "common mistakes and how to avoid them",
                     "sources of free advice", "what small groups can do on a tight budget"]
_MIN_TALK_LEFT = ["a set of leaflets", "a reading list", "contact details for further help",
                  "a short guide"]
_MIN_MATTERS_ARISING = ["the hall booking had been renewed", "the new padlock had been fitted",
                        "the grant report had been sent", "the bank mandate had been updated"]


def _min_perm(tag: str, seed: int, size: int, index: int) -> int:
  """Element `index` of a seeded permutation of range(size): unique per index, for any num_docs."""
  return _min_perm_table(tag, seed, size)[index]


@functools.lru_cache(maxsize=32)
def _min_perm_table(tag: str, seed: int, size: int) -> tuple[int, ...]:
  order = list(range(size))
  _rng("minutes", seed, tag).shuffle(order)
  return tuple(order)


_MIN_FIRST_DAY = datetime.date(2014, 1, 1)
_MIN_NUM_DAYS = (datetime.date(2024, 12, 31) - _MIN_FIRST_DAY).days + 1
_MIN_BUDGET_STEP, _MIN_BUDGET_MIN, _MIN_NUM_BUDGETS = 25, 1025, 2960  # £1,025 ... £75,000
_MINUTES_CAPACITY = min(len(_MIN_PLACES) * len(_MIN_FOCUS),
                        len(_MIN_VENUE_NAMES) * len(_MIN_VENUE_TYPES),
                        len(_LAST) * len(_MIN_TRADE_NAMES), _MIN_NUM_DAYS, _MIN_NUM_BUDGETS)


def _fmt_pounds(amount: int) -> str:
  return f"£{amount:,}"


def _sample_budget(r: random.Random) -> str:
  return _fmt_pounds(_MIN_BUDGET_MIN + _MIN_BUDGET_STEP * r.randrange(_MIN_NUM_BUDGETS))


def _budget_aliases(v: str) -> list[str]:
  num = v.removeprefix("£")
  return [num, num.replace(",", ""), "£" + num.replace(",", ""), f"{num} pounds", f"{v}.00"]


def _sample_min_date(r: random.Random) -> str:
  return _fmt_date(_random_date(r, _MIN_FIRST_DAY, datetime.date(2025, 3, 31)))


def _sample_vote(r: random.Random) -> str:
  yes = r.randint(4, 9)
  return f"{yes} to {r.randint(0, yes - 1)}"


_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _vote_aliases(v: str) -> list[str]:
  yes, no = (int(x) for x in v.split(" to "))
  return [f"{yes}-{no}", f"{yes}–{no}", f"{yes} votes to {no}",
          f"{_NUMBER_WORDS[yes]} to {_NUMBER_WORDS[no]}"]


def _sample_person(r: random.Random) -> str:
  return r.choice(_FEMALE_FIRST + _MALE_FIRST) + " " + r.choice(_LAST)


def _person_aliases(v: str) -> list[str]:
  return [v.split(" ")[-1]]


def _sample_supplier(r: random.Random) -> str:
  return f"{r.choice(_LAST)} {r.choice(_MIN_TRADE_NAMES)} Ltd"


_MINUTES_FIELDS = [
    FieldSpec("meeting_date", "On what date did {subject} take place?", _sample_min_date,
              _date_aliases),
    FieldSpec("chair", "Who chaired {subject}?", _sample_person, _person_aliases),
    FieldSpec("venue", "At which venue was {subject} held?",
              lambda r: f"{r.choice(_MIN_VENUE_NAMES)} {r.choice(_MIN_VENUE_TYPES)}",
              lambda v: [f"the {v}"]),
    FieldSpec("budget", "How much money was approved for the main project at {subject}?",
              _sample_budget, _budget_aliases),
    FieldSpec("vote", "What was the vote on the main motion at {subject}?", _sample_vote,
              _vote_aliases),
    FieldSpec("supplier", "Which supplier was chosen for the main project at {subject}?",
              _sample_supplier, lambda v: [v.removesuffix(" Ltd")]),
    FieldSpec("action_owner", "At {subject}, who took on the action to {action}?",
              _sample_person, _person_aliases),
    FieldSpec("action_deadline", "At {subject}, by what date was the action to {action} "
              "due?", _sample_min_date, _date_aliases),
    FieldSpec("next_meeting_date", "For what date was the next meeting after {subject} "
              "scheduled?", _sample_min_date, _date_aliases),
    FieldSpec("guest_speaker", "Who was the guest speaker at {subject}?", _sample_person,
              _person_aliases),
    FieldSpec("minute_taker", "Who took the minutes of {subject}?", _sample_person,
              _person_aliases),
]


def _minutes_names(seed: int, num_docs: int) -> list[tuple[str, str]]:
  """Unique (body name, focus) per document index: a seeded permutation of place x focus."""
  if num_docs > _MINUTES_CAPACITY:
    raise ValueError(f"kind 'minutes' supports at most {_MINUTES_CAPACITY} documents (unique "
                     f"bodies, dates, venues, budgets and suppliers), asked for {num_docs}")
  size = len(_MIN_PLACES) * len(_MIN_FOCUS)
  out = []
  for i in range(num_docs):
    k = _min_perm("names", seed, size, i)
    place, focus = _MIN_PLACES[k // len(_MIN_FOCUS)], _MIN_FOCUS[k % len(_MIN_FOCUS)]
    out.append((f"{place} {focus}", focus))
  return out


def _distinct_people(r: random.Random, n: int) -> list[str]:
  """`n` full names with pairwise different surnames (so "Ms Okafor" is never ambiguous)."""
  return [f"{r.choice(_FEMALE_FIRST + _MALE_FIRST)} {last}" for last in r.sample(_LAST, n)]


def _minutes_facts(seed: int, index: int, body: str, focus: str) -> Facts:
  r = _rng("minutes", seed, "facts", index)
  k = _min_perm("venue", seed, len(_MIN_VENUE_NAMES) * len(_MIN_VENUE_TYPES), index)
  venue = (f"{_MIN_VENUE_NAMES[k // len(_MIN_VENUE_TYPES)]} "
           f"{_MIN_VENUE_TYPES[k % len(_MIN_VENUE_TYPES)]}")
  k = _min_perm("supplier", seed, len(_LAST) * len(_MIN_TRADE_NAMES), index)
  trade = _MIN_TRADE_NAMES[k % len(_MIN_TRADE_NAMES)]
  supplier = f"{_LAST[k // len(_MIN_TRADE_NAMES)]} {trade} Ltd"
  day = _MIN_FIRST_DAY + datetime.timedelta(days=_min_perm("date", seed, _MIN_NUM_DAYS, index))
  budget = _MIN_BUDGET_MIN + _MIN_BUDGET_STEP * _min_perm("budget", seed, _MIN_NUM_BUDGETS, index)

  num_present = r.randint(6, 12)
  num_apologies = r.randint(0, 3)
  people = _distinct_people(r, num_present + num_apologies + 2)
  present, apologies = people[:num_present], people[num_present:num_present + num_apologies]
  minute_taker, guest = people[-2:]
  roles = r.sample(_MIN_ROLES, 2)  # officers among present[1:3]; present[0] chairs.
  yes = r.randint(4, min(9, num_present))
  no = r.randint(0, min(yes - 1, num_present - yes))
  abstain = r.randint(0, min(2, num_present - yes - no))
  actions = r.sample(_MIN_ACTIONS, r.randint(4, 6))
  offsets = r.sample([o for o in range(7, 91) if o % 7], len(actions))  # never a meeting day
  next_offset = 7 * r.randint(3, 9)
  owners = [r.choice(present[1:]) for _ in actions]
  key = r.randrange(len(actions))  # the questioned action item
  return {
      "body": body, "focus": focus, "noun": focus.split()[-1].lower(),
      "number": r.randint(12, 240), "weekday": f"{day:%A}", "meeting_date": _fmt_date(day),
      "start": r.choice([18 * 60 + 30, 19 * 60, 19 * 60 + 15, 19 * 60 + 30, 10 * 60, 14 * 60]),
      "length_minutes": r.randint(55, 150), "venue": venue, "budget": _fmt_pounds(budget),
      "trade": trade, "project": r.choice(_MIN_TRADES[trade]), "supplier": supplier,
      "num_quotes": r.randint(2, 5), "vote": f"{yes} to {no}", "abstain": abstain,
      "proposer": present[1 + r.randrange(num_present - 1)],
      "chair": present[0], "present": present, "apologies": apologies,
      "roles": {present[1]: roles[0], present[2]: roles[1]},
      "minute_taker": minute_taker, "guest_speaker": guest,
      "guest_affiliation": r.choice(_MIN_AFFILIATIONS), "guest_talk": r.choice(_MIN_TALKS),
      "actions": [(a, o, _fmt_date(day + datetime.timedelta(days=d)))
                  for a, o, d in zip(actions, owners, offsets)],
      "action": actions[key], "action_owner": owners[key],
      "action_deadline": _fmt_date(day + datetime.timedelta(days=offsets[key])),
      "next_weekday": f"{day + datetime.timedelta(days=next_offset):%A}",
      "next_meeting_date": _fmt_date(day + datetime.timedelta(days=next_offset)),
  }


def _minutes_content_refs(f: Facts) -> dict[str, str]:
  """Noun phrases naming the meeting by one unique fact each (paraphrases, never the body)."""
  return {
      "meeting_date": f"the meeting of {f['meeting_date']}",
      "venue": f"the meeting that took place at the {f['venue']}",
      "budget": f"the meeting that approved spending of {f['budget']}",
      "supplier": f"the meeting that chose {f['supplier']} as contractor",
  }


# Filler discussion topics: (agenda title, sentences). Slots are filled with incidental values
# that never equal a questioned fact: no full dates, no "N to M", amounts of money that are not
# multiples of 25 (every budget is), only names of members other than the chair.
_MIN_TOPICS = [
    ("Treasurer's report", [
        "The treasurer reported a current account balance of {money} and a reserve of {money2}.",
        "Income since the last meeting came mainly from subscriptions and a raffle, which raised "
        "{money_small}.",
        "{m1} asked whether the bank charges could be reduced, and the treasurer agreed to look "
        "into an account for community groups.",
        "Spending on {consumable} had been higher than expected because of {reason}.",
        "The accounts will be examined independently before the annual general meeting, and "
        "{m2} offered to help with the receipts.",
        "Members noted that {n_small} invoices were still outstanding and asked for reminders to "
        "be sent.",
        "The treasurer explained that the insurance premium had risen by about {pct} per cent "
        "this year.",
        "A donation of {money_small} from {donor} was gratefully acknowledged.",
    ]),
    ("Membership", [
        "The membership secretary reported that the {noun} now has {n_mid} paid-up members.",
        "In all, {n_small} new members had joined since the last meeting, most of them after the "
        "{season} open day.",
        "{m1} suggested a reduced subscription for students, which will be considered at the "
        "annual general meeting.",
        "Several members had asked for the newsletter to be sent by email rather than on paper.",
        "The welcome pack for new members is out of date and {m2} agreed to revise it.",
        "It was noted with regret that {n_small} long-standing members had not renewed this year.",
        "Members discussed whether to hold a social evening in {month} to welcome newcomers.",
    ]),
    ("Correspondence", [
        "The secretary had received a letter from {org} about {letter_topic}.",
        "An email from {org} asked whether the {noun} would take part in the {season} festival.",
        "A resident had written to complain about {complaint}; the secretary will reply "
        "politely.",
        "A catalogue of {catalogue} had arrived and was passed round the table.",
        "{m1} reported a telephone call from {org}, who hope to visit in {month}.",
        "There was a thank-you card from the family of a former member, which was read out.",
        "The secretary noted {n_small} items of routine correspondence that needed no action.",
    ]),
    ("Maintenance", [
        "{m1} reported that {fault} and that a temporary repair had been made.",
        "The annual safety inspection found {n_small} minor issues, all of which are now resolved.",
        "A volunteer work party in {month} cleared {work}, and {n_mid} bags of rubbish were "
        "removed.",
        "The key holder list was checked and {m2} will return a spare key.",
        "Members agreed that the condition of the {asset} should be reviewed in the {season}.",
        "{m3} offered to repaint the {paintable} if materials can be found for less than "
        "{money_small}.",
        "The lock on the {door} is sticking again and will be oiled before the next meeting.",
    ]),
    ("Events", [
        "Plans for the {season} fair are progressing, with {n_mid} stalls already booked.",
        "{m1} proposed a quiz night in {month}, with tickets at {money_tiny} each.",
        "Last year's open day attracted about {n_big} visitors despite {weather}.",
        "Volunteers are still needed for {event_job}, and {m2} will put a sign-up sheet out.",
        "A talk on {talk} has been pencilled in for the {season}.",
        "Members agreed that refreshments should be kept simple and that {m3} would coordinate.",
        "The raffle prizes from local shops were listed, and {n_small} more are expected.",
    ]),
    ("Health and safety", [
        "The first aid box was checked by {m1} and {n_small} items were replaced.",
        "The accident book records {n_small} minor incidents since the last review, none serious.",
        "Members were reminded that the fire exit must be kept clear at all times.",
        "{m2} suggested a refresher on the evacuation procedure for new volunteers.",
        "The risk assessment for lone working was read through and no changes were needed.",
        "A trip hazard near the {asset} has been marked with tape until it can be fixed.",
        "The defibrillator pads expire in {month} and replacements will be ordered.",
    ]),
    ("Website and communications", [
        "The website had about {n_big} visits last month, mostly to the events page.",
        "{m1} has updated the photographs on the home page.",
        "The social media page now has {n_big} followers, and {m2} asked for more posts about "
        "volunteering.",
        "The newsletter will move to a {frequency} schedule from the {season}.",
        "A member had found an old email address on the website, which will be corrected.",
        "Members agreed that minutes should be posted online once approved.",
        "{m3} offered to write a short piece on the history of the {noun} for the newsletter.",
    ]),
    ("Grants and fundraising", [
        "An application to {org} for {money2} is being prepared by {m1}.",
        "The bid to the lottery fund was unsuccessful this round, but feedback has been requested.",
        "The sponsored walk raised {money2}, which will go towards {cause}.",
        "{m2} reported that the supermarket token scheme could bring in {money_small} this year.",
        "Members discussed a crowdfunding page but agreed to wait until the {season}.",
        "A local business has offered to match donations up to {money_small}.",
        "The grants calendar was circulated and deadlines were noted by the secretary.",
    ]),
    ("Volunteers", [
        "No fewer than {n_small} volunteers helped at the last work party, and their effort "
        "was warmly noted.",
        "{m1} is compiling a list of volunteers' skills so that tasks can be shared more fairly.",
        "Members agreed that a thank-you event should be held in {month}.",
        "Two volunteers have completed the food hygiene course, paid for by the {noun}.",
        "{m2} reminded members that volunteers must sign in and out on work days.",
        "The volunteer handbook needs updating, and {m3} agreed to take a first look.",
        "Younger volunteers from the local school are welcome on {weekday_plural}.",
    ]),
    ("Neighbouring groups", [
        "{m1} attended a meeting of {org} and reported on plans for {plan}.",
        "The {noun} has been invited to share a stall with {org} at the {season} show.",
        "Members agreed to lend folding tables to {org} for their {event}.",
        "A joint litter pick with {org} is planned for a Saturday in {month}.",
        "{m2} suggested a shared newsletter with {org}, which will be explored.",
        "The chair thanked {org} for the loan of their gazebo last year.",
    ]),
    ("Equipment and storage", [
        "The inventory lists {n_mid} folding chairs, of which {n_small} are broken.",
        "{m1} reported that the store room is full and that old display boards could be recycled.",
        "Members agreed to buy {n_small} new storage boxes at a cost of about {money_small}.",
        "The urn has been serviced and passed its electrical test.",
        "{m2} asked that borrowed equipment be recorded in the book by the door.",
        "A second-hand {item} was offered by a member and gratefully accepted.",
    ]),
    ("Planning and local matters", [
        "The secretary reported on a planning application near the {asset}, which members "
        "noted.",
        "{m1} raised concerns about {local_issue}, and it was agreed to raise them with {org}.",
        "The consultation on the local plan closes in {month}, and members were encouraged to "
        "respond.",
        "Members discussed {local_issue} at some length without reaching a view.",
        "{m2} will attend the public meeting on {plan} and report back.",
        "It was noted that the bus service is to be reduced on {weekday_plural}.",
    ]),
]
_MIN_FILL = {
    "consumable": ["postage", "printer ink", "cleaning materials", "refreshments", "plants"],
    "reason": ["the extra events this year", "rising prices", "a delayed refund",
               "a one-off order for the open day"],
    "donor": ["a former member", "a local bakery", "an anonymous well-wisher",
              "the parish church"],
    "org": ["the parish council", "the district council", "the county federation",
            "a neighbouring village group", "the local primary school", "the rotary club",
            "the women's institute", "the residents' association"],
    "letter_topic": ["changes to the recycling collection", "a new speed limit",
                     "the closure of a footpath", "a survey of community buildings"],
    "complaint": ["noise on a Friday evening", "parking near the entrance",
                  "an overgrown hedge", "litter after an event"],
    "catalogue": ["garden supplies", "stationery", "outdoor furniture", "display materials"],
    "fault": ["a window catch had broken", "a gutter was leaking", "a light fitting had failed",
              "the back gate had dropped on its hinges", "a tap was dripping"],
    "work": ["the overgrown corner by the shed", "brambles along the fence",
             "leaves from the drains", "the old compost bays"],
    "asset": ["notice board", "bench by the gate", "store room door", "side path", "bike rack",
              "flower beds", "boundary hedge"],
    "paintable": ["notice board", "bench by the gate", "store room door", "bike rack",
                  "garden shed"],
    "door": ["store room door", "side gate", "garden shed", "kitchen cupboard"],
    "weather": ["heavy rain", "a cold wind", "a clash with a football match", "roadworks"],
    "event_job": ["the tea tent", "car parking", "the tombola", "setting up and clearing away"],
    "talk": ["local wildflowers", "old maps of the area", "the canal in wartime", "bats"],
    "frequency": ["monthly", "quarterly", "bimonthly"],
    "cause": ["new equipment", "the repair fund", "the youth bursary", "the centenary book"],
    "plan": ["a new cycle route", "the market square", "a community library",
             "the river clean-up"],
    "event": ["jumble sale", "harvest supper", "plant sale", "annual show"],
    "item": ["gazebo", "filing cabinet", "laptop", "pressure washer", "ladder"],
    "local_issue": ["speeding on the main road", "flooding on the lower lane",
                    "the future of the post office", "dog fouling on the green"],
    "weekday_plural": ["Mondays", "Tuesdays", "Wednesdays", "Saturdays", "Sundays"],
    "season": ["spring", "summer", "autumn", "winter"],
    "month": ["January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"],
}


def _odd_pounds(r: random.Random, lo: int, hi: int) -> str:
  """An amount in [lo, hi] that is not a multiple of 25 (so never any budget)."""
  v = r.randint(lo, hi)
  return _fmt_pounds(v if v % 25 else v + 1)


def _minutes_sentence(r: random.Random, template: str, f: Facts, members: list[str]) -> str:
  """Fills one filler sentence with incidental values (never a questioned fact)."""
  m = r.sample(members, 3)
  values = {k: r.choice(v) for k, v in _MIN_FILL.items()}
  return template.format(
      m1=m[0], m2=m[1], m3=m[2], noun=f["noun"], n_small=r.randint(2, 9),
      n_mid=r.randint(11, 95), n_big=r.randint(120, 950), pct=r.randint(3, 19),
      money=_odd_pounds(r, 1001, 19999), money2=_odd_pounds(r, 501, 9999),
      money_small=_odd_pounds(r, 51, 999), money_tiny=_odd_pounds(r, 2, 9), **values)


def _minutes_item(r: random.Random, title: str, pool: list[str], f: Facts,
                  members: list[str]) -> tuple[str, list[str]]:
  """(agenda title, 2-3 paragraphs of 2-4 sentences) from one topic's sentence pool."""
  order = r.sample(pool, len(pool))
  paras = []
  for _ in range(r.randint(2, 3)):
    if len(order) < 2:
      break
    n = r.randint(2, min(4, len(order)))
    paras.append(" ".join(_minutes_sentence(r, s, f, members) for s in order[:n]))
    order = order[n:]
  return title, paras


def _clock12(minutes: int) -> str:
  """Minutes after midnight -> "7:30 pm"."""
  h, m = divmod(minutes % 1440, 60)
  return f"{h % 12 or 12}:{m:02d} {'am' if h < 12 else 'pm'}"


def _render_minutes(f: Facts, r: random.Random, words_per_doc: int | None) -> tuple[str, str]:
  body, noun = f["body"], f["noun"]
  members = f["present"][1:]  # never the chair: the chair's name is stated once
  title = f"Minutes of the {body}"
  role_of = f["roles"]
  present = ", ".join([f"{f['chair']} (chair)"] +
                      [f"{p} ({role_of[p]})" if p in role_of else p for p in members])
  header = (
      f"# {title}\n\n"
      f"Meeting no. {f['number']} of the {body}, held on {f['weekday']}, {f['meeting_date']}, "
      f"at the {f['venue']}. The meeting opened at {_clock12(f['start'])} with "
      f"{len(f['present'])} members present, which is quorate.")
  attendance = (
      "## Attendance\n\n"
      f"Present: {present}.\n\n"
      + (f"Apologies: {', '.join(f['apologies'])}." if f["apologies"] else
         "Apologies: none received.")
      + "\n\nIn attendance: the minute secretary and "
      + r.choice(["one member of the public.", "two members of the public.",
                  "no members of the public.", "a guest speaker (see below)."]))
  others = [p for p in members if p != f["proposer"]]
  seconder = r.choice(others)
  main_title = f"Quotations for {f['project']}"
  differ1, differ2 = r.choice(_MIN_QUOTE_DIFFS[0]), r.choice(_MIN_QUOTE_DIFFS[1])
  asked = r.choice(_MIN_QUOTE_ASKS)
  main = [
      f"{f['proposer']} reported that {f['num_quotes']} firms had quoted for {f['project']} "
      f"after the invitation agreed earlier in the year. The quotations differed mainly in "
      f"{differ1} and in {differ2}.",
      f"Members asked {asked}. {seconder} pointed out that the reserve fund could cover the cost "
      "without a grant, although it would leave little for emergencies. The chair asked for a "
      "formal motion, and the outcome is recorded under Decisions.",
  ]
  guest_title = "Guest speaker"
  covered, num_asked, left = r.choice(_MIN_TALK_COVERED), r.randint(3, 9), r.choice(_MIN_TALK_LEFT)
  guest = [
      f"The chair welcomed {f['guest_speaker']}, {f['guest_affiliation']}, who spoke about "
      f"{f['guest_talk']}. The talk covered {covered}, and members asked {num_asked} questions "
      "afterwards.",
      f"The speaker left {left} for members, and the chair thanked the speaker on behalf of the "
      f"{noun}.",
  ]
  who, done = r.choice(members), r.choice(_MIN_MATTERS_ARISING)
  prev = ("Minutes of the previous meeting and matters arising",
          ["The minutes of the previous meeting were agreed as a correct record and signed by "
           f"the chair. Under matters arising, {who} confirmed that {done}."])

  topics = r.sample(_MIN_TOPICS, len(_MIN_TOPICS))
  decided = [
      f"Resolved that {f['budget']} be spent from the reserve fund on {f['project']}. Proposed by "
      f"{f['proposer']} and seconded by {seconder}; carried by {f['vote']}"
      + (f", with {f['abstain']} abstention{'s' if f['abstain'] > 1 else ''}."
         if f["abstain"] else ", with no abstentions."),
      f"Agreed that the contract for the work be placed with {f['supplier']}, subject to "
      "written confirmation of the start date.",
  ] + r.sample([
      "Agreed without a vote to renew the affiliation to the county federation.",
      "Agreed by consensus that the annual general meeting be held in the spring.",
      f"Agreed that the {noun} send a card of thanks to the retiring caretaker.",
      "Agreed that the petty cash float be reviewed by the treasurer.",
      "Agreed by consensus to adopt the updated data protection notice.",
      "Agreed that members' expenses be claimed within three months.",
  ], r.randint(1, 3))
  decisions = "## Decisions\n\n" + "\n".join(f"{i + 1}. {d}" for i, d in enumerate(decided))
  actions = "## Action items\n\n" + "\n".join(
      f"- {a[0].upper()}{a[1:]}: {o}, by {d}." for a, o, d in f["actions"])
  next_meeting = (
      "## Next meeting\n\n"
      f"The next meeting will be on {f['next_weekday']}, {f['next_meeting_date']}, at "
      f"{_clock12(f['start'])}, at the same venue. There being no further business, the chair "
      f"closed the meeting at {_clock12(f['start'] + f['length_minutes'])}.\n\n"
      f"Minutes taken by {f['minute_taker']}.")

  def assemble(fillers: list[tuple[str, list[str]]]) -> str:
    items = [prev, (main_title, main), *fillers[:len(fillers) // 2], (guest_title, guest),
             *fillers[len(fillers) // 2:]]
    agenda = "## Agenda\n\n" + "\n".join(
        [f"{i + 1}. {t}" for i, (t, _) in enumerate(items)]
        + [f"{len(items) + 1}. Decisions and action items", f"{len(items) + 2}. Date of next "
           "meeting"])
    discussion = "## Discussion\n\n" + "\n\n".join(
        f"### {i + 1}. {t}\n\n" + "\n\n".join(paras) for i, (t, paras) in enumerate(items))
    return "\n\n".join([header, attendance, agenda, discussion, decisions, actions,
                        next_meeting]) + "\n"

  # Natural length: a target of 1,150-3,500 approx tokens per document; each filler item adds
  # at most ~300, so every document stays within 1,000-4,000. words_per_doc: as many filler
  # items as reach that many words (at least one).
  target = r.randint(1150, 3500)
  fillers: list[tuple[str, list[str]]] = []
  text = assemble(fillers)
  rounds = 0
  while (approx_num_tokens(text) < target if words_per_doc is None
         else (not fillers or _words(text) < words_per_doc)):
    if not topics:
      rounds += 1
      topics = r.sample(_MIN_TOPICS, len(_MIN_TOPICS))
    t, pool = topics.pop()
    fillers.append(_minutes_item(r, t if not rounds else f"{t} (continued, part {rounds + 1})",
                                 pool, f, members))
    text = assemble(fillers)
  return title, text


# =============================================================================== content refs
#
# Patients and products name a document by content through *descriptors*: facts of the document
# restated in derived or paraphrased form (a decade for a date of birth, a season for a date, a
# band for a number, a body system for a diagnosis, number words for counts), never the sentence
# of the text and never the name. A content question combines two (or three, four) descriptors
# whose combination no other document of the collection shares (checked against every other
# document's facts), so each question still has exactly one gold document; descriptors derived
# from the asked field are left out (the question never gives its own answer away).

_SEASONS = {12: "winter", 1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring",
            6: "summer", 7: "summer", 8: "summer", 9: "autumn", 10: "autumn", 11: "autumn"}
_NUMBER_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                 "seventeen", "eighteen", "nineteen", "twenty"]
_DECADE_AGE = {2: "twenties", 3: "thirties", 4: "forties", 5: "fifties", 6: "sixties",
               7: "seventies", 8: "eighties", 9: "nineties"}
# Body system of each diagnosis (a paraphrase: none of these words is the diagnosis' name).
_DIAG_SYSTEM = {
    "community-acquired pneumonia": "a lung infection",
    "acute decompensated heart failure": "a failing heart",
    "diabetic ketoacidosis": "a blood sugar emergency",
    "acute pancreatitis": "an inflamed digestive organ",
    "non-ST-elevation myocardial infarction": "a heart attack",
    "pulmonary embolism": "a blood clot",
    "acute cholecystitis": "an inflamed digestive organ",
    "cellulitis of the left leg": "a skin infection",
    "upper gastrointestinal bleeding": "bleeding from the gut",
    "pyelonephritis": "a kidney infection",
    "exacerbation of COPD": "a chronic lung disease flaring up",
    "atrial fibrillation with rapid ventricular response": "an irregular heartbeat",
    "acute ischemic stroke": "a stroke",
    "acute kidney injury": "failing kidneys",
    "small bowel obstruction": "a blocked intestine",
    "sepsis from a urinary source": "a kidney infection",
    "hypertensive emergency": "dangerously high blood pressure",
    "acute appendicitis": "an inflamed digestive organ",
    "sigmoid diverticulitis": "an inflamed digestive organ",
    "hyperosmolar hyperglycemic state": "a blood sugar emergency",
    "deep vein thrombosis": "a blood clot",
    "syncope due to complete heart block": "an irregular heartbeat",
    "alcoholic hepatitis": "liver damage",
    "asthma exacerbation": "an airway disease flaring up",
    "Clostridioides difficile colitis": "a gut infection",
    "fracture of the right hip": "a broken bone",
    "symptomatic hyponatremia": "a salt imbalance",
    "infective endocarditis": "an infection of the heart",
    "bacterial meningitis": "an infection of the brain's lining",
    "acute gout flare": "a painful joint",
}
_COUNTRY_REGION = {
    "Portugal": "on the Iberian peninsula", "Vietnam": "in Southeast Asia",
    "Mexico": "in North America", "Poland": "in Central Europe", "Malaysia": "in Southeast Asia",
    "Czech Republic": "in Central Europe", "Taiwan": "in East Asia",
    "Turkey": "on the Bosphorus", "Estonia": "in the Baltic states",
    "Thailand": "in Southeast Asia", "Slovenia": "in the Alpine region",
    "Tunisia": "in North Africa"}
_MATERIAL_FAMILY = {
    "anodized aluminum": "a light-metal", "recycled polycarbonate": "a plastic",
    "brushed stainless steel": "a steel", "bamboo composite": "a plant-based",
    "glass-filled nylon": "a plastic", "powder-coated steel": "a steel",
    "ABS plastic": "a plastic", "magnesium alloy": "a light-metal"}

# A descriptor: (name, fields it is derived from, comparison key, relative clause).
Descriptor = tuple[str, frozenset, object, str]


def _number_name(n: int) -> str:
  return _NUMBER_NAMES[n] if 0 <= n < len(_NUMBER_NAMES) else str(n)


def _parse_date(v: str) -> datetime.date:
  return datetime.datetime.strptime(v, "%B %d, %Y").date()


def _season(d: datetime.date) -> tuple[str, str]:
  """("spring", "2024") for March .. May 2024; ("winter", "2023-24") for December 2023 ..
  February 2024."""
  season = _SEASONS[d.month]
  if season != "winter":
    return season, str(d.year)
  first = d.year - (d.month != 12)
  return season, f"{first}-{(first + 1) % 100:02d}"


def _num(v: str) -> float:
  """The number of a value string: "$1,249.99" -> 1249.99, "7.9%" -> 7.9, "45 W" -> 45.0."""
  return float(v.lstrip("$£").split(" ")[0].rstrip("%").replace(",", ""))


def _patient_descriptors(f: Facts) -> list[Descriptor]:
  dob, admit = _parse_date(f["date_of_birth"]), _parse_date(f["admission_date"])
  season, year = _season(admit)
  sex = "woman" if f["sex"] == "F" else "man"
  los, weeks = f["length_of_stay"], f["follow_up_weeks"]
  out = [
      ("birth_decade", frozenset({"date_of_birth"}), dob.year // 10,
       f"was born in the {dob.year // 10 * 10}s"),
      ("age", frozenset({"date_of_birth", "admission_date"}), (f["sex"], f["age"] // 10),
       f"was a {sex} in {'her' if f['sex'] == 'F' else 'his'} {_DECADE_AGE.get(f['age'] // 10, 'nineties')} "
       "at the time"),
      ("admit_season", frozenset({"admission_date"}), (season, year),
       f"came into hospital in the {season} of {year}"),
      ("stay", frozenset({"admission_date"}), los,
       f"spent {_number_name(los)} days on the ward"),
      ("attending", frozenset({"attending"}), f["attending"].split()[-1],
       f"was looked after by Dr. {f['attending'].split()[-1]} on the ward"),
      ("system", frozenset({"primary_diagnosis", "procedure", "follow_up_clinic"}),
       _DIAG_SYSTEM[f["primary_diagnosis"]], f"was treated for {_DIAG_SYSTEM[f['primary_diagnosis']]}"),
      ("follow_up", frozenset({"follow_up_clinic"}), weeks,
       f"is due back at a clinic {_number_name(weeks)} week{'s' if weeks > 1 else ''} after going home"),
      ("reaction", frozenset({"allergy"}), f["allergy_reaction"],
       f"once reacted to something with {f['allergy_reaction']}"),
  ]
  # "Dr. Lindqvist" must not name a patient called Lindqvist.
  same = f["attending"].split()[-1] == f["name"].split()[-1]
  return [d for d in out if not (same and d[0] == "attending")]


def _band(x: float, width: float) -> tuple[float, float]:
  lo = math.floor(x / width) * width
  return lo, lo + width


def _product_descriptors(f: Facts) -> list[Descriptor]:
  rel = _parse_date(f["release_date"])
  season, year = _season(rel)
  price, weight, battery = _num(f["price"]), _num(f["weight"]), _num(f["battery_life"])
  power, temp = _num(f["power_rating"]), _num(f["operating_temperature"])
  plo, phi = _band(price, 100)
  wlo, whi = _band(weight, 1)
  blo, bhi = _band(battery, 10)
  wlo_lo, pw_hi = _band(power, 20)
  tlo, _ = _band(temp, 10)
  warranty = f["warranty"]
  wnum, wunit = warranty.split(" ")
  return [
      ("release_season", frozenset({"release_date"}), (season, year),
       f"came on the market in the {season} of {year}"),
      ("price_band", frozenset({"price"}), plo,
       "sells for under a hundred dollars" if plo == 0 else
       f"sells for somewhere between {int(plo)} and {int(phi)} dollars"),
      ("weight_band", frozenset({"weight"}), wlo,
       "weighs less than a kilogram" if wlo == 0 else
       f"weighs between {_number_name(int(wlo))} and {_number_name(int(whi))} kilograms"),
      ("battery_band", frozenset({"battery_life"}), blo,
       f"runs for {int(blo)} to {int(bhi)} hours on one charge"),
      ("power_band", frozenset({"power_rating"}), wlo_lo,
       f"draws between {int(wlo_lo)} and {int(pw_hi)} watts"),
      ("heat", frozenset({"operating_temperature"}), tlo,
       f"is rated for ambient heat in the {int(tlo)}s (degrees Celsius)"),
      ("region", frozenset({"country_of_manufacture"}), _COUNTRY_REGION[f["country_of_manufacture"]],
       f"is put together {_COUNTRY_REGION[f['country_of_manufacture']]}"),
      ("housing", frozenset({"housing_material"}), _MATERIAL_FAMILY[f["housing_material"]],
       f"has {_MATERIAL_FAMILY[f['housing_material']]} shell"),
      ("warranty", frozenset({"warranty"}), warranty,
       f"is covered for {_number_name(int(wnum))} {wunit} against defects"),
      # Partly lexical (a word of the text), shared by many products: what BM25 can latch onto.
      ("brand", frozenset({"manufacturer"}), f["manufacturer"].split()[0],
       f"comes from the {f['manufacturer'].split()[0]} brand"),
      ("service", frozenset(), f["support_street"],
       f"is repaired by the workshop on {f['support_street']}"),
  ]


def _descriptor_index(descs: list[list[Descriptor]]) -> dict[str, dict[object, set[int]]]:
  """descriptor name -> its value -> the documents that have it."""
  index: dict[str, dict[object, set[int]]] = {}
  for i, ds in enumerate(descs):
    for name, _, key, _ in ds:
      index.setdefault(name, {}).setdefault(key, set()).add(i)
  return index


def _unique_combo(descs: list[list[Descriptor]], index: dict, i: int, exclude: frozenset,
                  r: random.Random, sizes: tuple[int, ...] = (2, 3, 4)) -> list[Descriptor] | None:
  """Descriptors of doc i (2 to 4, none derived from a field in `exclude`) whose values no other
  document has all of; combinations tried in a seeded random order; None if none is unique."""
  mine = [d for d in descs[i] if not (d[1] & exclude)]
  for size in sizes:
    combos = list(itertools.combinations(range(len(mine)), size))
    r.shuffle(combos)
    for c in combos:
      chosen = [mine[j] for j in c]
      docs = set.intersection(*(index[d[0]][d[2]] for d in chosen))
      if docs == {i}:
        return chosen
  return None


def _describe(noun: str, chosen: list[Descriptor]) -> str:
  """"the patient who was born in the 1950s and spent nine days on the ward"."""
  clauses = [d[3] for d in chosen]
  rel = "who" if noun == "patient" else "that"
  joined = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
  return f"the {noun} {rel} {joined}"


# =============================================================================== engine


@dataclasses.dataclass(frozen=True)
class PairSpec:
  """A field two documents can be compared on: ops "higher" (which of the two has the higher
  value: the answer is a subject), "difference" / "sum" (a number with the field's unit) or
  "earlier" (a date field: which came first)."""
  key: str
  noun: str = ""  # "hemoglobin on admission"
  ops: tuple[str, ...] = ("higher", "difference")
  verb: str = ""  # for "earlier": "was admitted to the hospital"


_PAIR_TEMPLATES = {
    "higher": "Of {a} and {b}, which one had the higher {noun}?",
    "difference": "What is the difference between the {noun} of {a} and the {noun} of {b}?",
    "sum": "What is the combined {noun} of {a} and {b}?",
    "earlier": "Of {a} and {b}, which one {verb} first?",
}
_PAIR_CONTENT_TEMPLATES = {
    "higher": "Which of the two had the higher {noun}?",
    "difference": "What is the difference between their {noun} values?",
    "sum": "What is their combined {noun}?",
    "earlier": "Which of the two {verb} first?",
}


@dataclasses.dataclass(frozen=True)
class _Kind:
  fields: list[FieldSpec]
  names: Callable[[int, int], list[tuple[str, str]]]
  facts: Callable[[int, int, str, str], Facts]
  render: Callable[[Facts, random.Random, int | None], tuple[str, str]]
  subject: Callable[[Facts], str]
  doc_prefix: str
  # How questions name the document (default: `subject`), e.g. "the meeting of the X Society".
  question_subject: Callable[[Facts], str] | None = None
  # Content references, one of two styles. `content_refs` (minutes): ref field -> noun phrase
  # naming the document by that (collection-unique) fact; `descriptors` (patients, products):
  # derived facts combined until unique in the collection (see `_unique_combo`).
  content_refs: Callable[[Facts], dict[str, str]] | None = None
  descriptors: Callable[[Facts], list[Descriptor]] | None = None
  content_noun: str = ""  # "patient": "the patient who ..."
  this_subject: str = ""  # the field templates' {subject} after a description: "this patient"
  default_refs: tuple[str, ...] = ("title",)  # question_refs=None
  pair_fields: tuple[PairSpec, ...] = ()
  pair_subject: Callable[[Facts], str] | None = None  # {a}/{b} naming by title


_PATIENT_PAIRS = (
    PairSpec("hemoglobin", "hemoglobin on admission"),
    PairSpec("creatinine", "serum creatinine on admission"),
    PairSpec("hba1c", "HbA1c on admission"),
    PairSpec("admission_date", ops=("earlier",), verb="was admitted to the hospital"),
    PairSpec("date_of_birth", ops=("earlier",), verb="was born"),
)
_PRODUCT_PAIRS = (
    PairSpec("price", "list price", ("higher", "sum")),
    PairSpec("weight", "weight", ("higher", "sum")),
    PairSpec("battery_life", "specified battery life"),
    PairSpec("power_rating", "rated power"),
    PairSpec("operating_temperature", "maximum operating temperature"),
    PairSpec("release_date", ops=("earlier",), verb="was released"),
)
_MINUTES_PAIRS = (
    PairSpec("budget", "amount approved for the main project", ("higher", "sum")),
    PairSpec("meeting_date", ops=("earlier",), verb="took place"),
)

KINDS = {
    "patients": _Kind(_PATIENT_FIELDS, _patient_names, _patient_facts, _render_patient,
                      lambda f: f["name"], "patient", descriptors=_patient_descriptors,
                      content_noun="patient", this_subject="this patient",
                      pair_fields=_PATIENT_PAIRS),
    "products": _Kind(_PRODUCT_FIELDS, _product_names, _product_facts, _render_product,
                      lambda f: f["name"], "product", descriptors=_product_descriptors,
                      content_noun="product", this_subject="product",
                      pair_fields=_PRODUCT_PAIRS, pair_subject=lambda f: f"the {f['name']}"),
    "minutes": _Kind(_MINUTES_FIELDS, _minutes_names, _minutes_facts, _render_minutes,
                     lambda f: f["body"], "minutes",
                     question_subject=lambda f: f"the meeting of the {f['body']}",
                     content_refs=_minutes_content_refs, default_refs=("title", "content"),
                     content_noun="meeting",
                     pair_fields=_MINUTES_PAIRS),
}
QUESTION_REFS = ("title", "content")


def _get_kind(kind: str) -> _Kind:
  if kind not in KINDS:
    raise ValueError(f"Unknown synthetic collection kind {kind!r}; choose from {sorted(KINDS)}")
  return KINDS[kind]


def field_keys(kind: str = "patients") -> list[str]:
  """The questioned fact types of a kind (every document has all of them)."""
  return [s.key for s in _get_kind(kind).fields]


def all_facts(num_docs: int, seed: int, kind: str = "patients") -> list[Facts]:
  """The fact dictionaries of every document (small; no text)."""
  k = _get_kind(kind)
  if num_docs < 1:
    raise ValueError(f"num_docs must be >= 1, got {num_docs}")
  return [k.facts(seed, i, a, b) for i, (a, b) in enumerate(k.names(seed, num_docs))]


def _distractors(r: random.Random, facts: list[Facts], i: int, spec: FieldSpec,
                 n: int) -> tuple[list[str], str]:
  """`n` distinct wrong values of field `spec` for document i: other documents' values first."""
  answer = facts[i][spec.key]
  out: list[str] = []
  num_docs = len(facts)
  tries = 0
  while len(out) < n and num_docs > 1 and tries < 20 * n:
    j = r.randrange(num_docs - 1)
    j += j >= i
    v = facts[j][spec.key]
    if v != answer and v not in out:
      out.append(v)
    tries += 1
  return fill_distractors(r, out, n, answer, spec.sample, spec.key)


def fill_distractors(r: random.Random, out: list[str], n: int, answer: str, sample: Callable[[random.Random], str],
                     what: str) -> tuple[list[str], str]:
  """Tops `out` (wrong values taken from other documents) up to `n` distinct values with
  `sample(r)`; returns (out, source): "documents", "pool" or "mixed" by where they came from."""
  from_docs = len(out)
  tries = 0
  while len(out) < n:
    v = sample(r)
    if v != answer and v not in out:
      out.append(v)
    tries += 1
    if tries > 10000:
      raise RuntimeError(f"cannot find {n} distinct distractors for field {what!r}")
  return out, "documents" if from_docs == n else ("pool" if from_docs == 0 else "mixed")


def _ask(spec: FieldSpec, f: Facts, subject: str) -> str:
  """The question text: the template with {subject} and any other fact of the document."""
  return spec.question.format(**{**f, "subject": subject})


def _content_subject(kind: _Kind, facts: list[Facts], i: int, exclude: str, r: random.Random,
                     descs: list | None, index: dict | None) -> tuple[str, dict] | None:
  """A noun phrase naming document i by content (never by its subject), for a question about
  field `exclude`, and the meta recording how; None when no unique reference exists."""
  f = facts[i]
  if kind.content_refs is not None:
    refs = kind.content_refs(f)
    ref = r.choice(sorted(k for k in refs if k != exclude))
    return refs[ref], {"ref_field": ref}
  chosen = _unique_combo(descs, index, i, frozenset({exclude}), r)
  if chosen is None:
    return None
  return _describe(kind.content_noun, chosen), {"ref_fields": [d[0] for d in chosen]}


def _questions(kind: _Kind, facts: list[Facts], i: int, doc_id: str, seed: int, kind_name: str,
               refs: tuple[str, ...], descs: list | None = None,
               index: dict | None = None) -> list[Question]:
  """The single-document questions of document i: per field an MC + short pair naming the
  document (refers "title") and/or one referring to it by content (refers "content")."""
  f = facts[i]
  r = _rng(kind_name, seed, "questions", i)
  subject = (kind.question_subject or kind.subject)(f)
  ref_r = _rng(kind_name, seed, "content-refs", i)
  # meta "refers" on every question whenever the set can hold content questions (patients and
  # products with only title questions are written exactly as before the option existed).
  mark = "content" in refs or kind.content_refs is not None
  out = []
  for spec in kind.fields:
    answer = f[spec.key]
    text = _ask(spec, f, subject)
    distractors, source = _distractors(r, facts, i, spec, NUM_OPTIONS - 1)
    idx = r.randrange(NUM_OPTIONS)
    options = distractors[:idx] + [answer] + distractors[idx:]
    aliases = [a for a in dict.fromkeys(spec.aliases(answer)) if a and a != answer]
    if "title" in refs:
      meta = {"field": spec.key, "refers": "title"} if mark else {"field": spec.key}
      out.append(Question(qid=f"{doc_id}/{spec.key}/mc", doc_id=doc_id, kind="mc", question=text,
                          options=options, answer_index=idx,
                          meta={**meta, "distractor_source": source}))
      out.append(Question(qid=f"{doc_id}/{spec.key}/short", doc_id=doc_id, kind="short",
                          question=text, answer=answer, aliases=aliases, meta=meta))
    if "content" not in refs:
      continue
    # The same question (same options), naming the document by content.
    ref = _content_subject(kind, facts, i, spec.key, ref_r, descs, index)
    if ref is None:
      logging.warning("%s: no combination of descriptors is unique in the collection for field %r; "
                      "no content question", doc_id, spec.key)
      continue
    phrase, how = ref
    ctext = (_ask(spec, f, phrase) if kind.content_refs is not None
             else f"Consider {phrase}. {_ask(spec, f, kind.this_subject)}")
    cmeta = {"field": spec.key, "refers": "content", **how}
    out.append(Question(qid=f"{doc_id}/{spec.key}/content/mc", doc_id=doc_id, kind="mc",
                        question=ctext, options=options, answer_index=idx,
                        meta={**cmeta, "distractor_source": source}))
    out.append(Question(qid=f"{doc_id}/{spec.key}/content/short", doc_id=doc_id, kind="short",
                        question=ctext, answer=answer, aliases=aliases, meta=cmeta))
  return out


def _fmt_like(x: float, like: str) -> str:
  """`x` written as the value string `like` is: "$" / "£" prefix, decimals, thousands commas,
  unit suffix ("%", " g/dL", " hours")."""
  prefix = like[0] if like[:1] in "$£" else ""
  body = like[len(prefix):]
  num, sep, unit = body.partition(" ")
  if num.endswith("%"):
    num, unit, sep = num[:-1], "%", ""
  dec = len(num.split(".")[1]) if "." in num else 0
  out = f"{x:,.{dec}f}" if "," in num or (prefix == "£") else f"{x:.{dec}f}"
  return f"{prefix}{out}{sep}{unit}"


def _pair_question(kind: _Kind, facts: list[Facts], i: int, j: int, n: int, doc_ids: list[str],
                   r: random.Random, refs: tuple[str, ...], descs, index) -> list[Question]:
  """An MC + short pair of questions whose answer needs documents i and j (both gold, i first):
  which of the two has the higher value / came first, or the difference / sum of their values.
  [] when the two values are equal (no right answer) or no unique content reference exists."""
  fa, fb = facts[i], facts[j]
  spec = r.choice(kind.pair_fields)
  op = r.choice(spec.ops)
  refers = r.choice(refs)
  parse = _parse_date if op == "earlier" else _num
  va, vb = parse(fa[spec.key]), parse(fb[spec.key])
  if va == vb:
    return []
  how: dict = {}
  if refers == "title":
    name = kind.pair_subject or kind.question_subject or kind.subject
    a, b = name(fa), name(fb)
  else:
    ra = _content_subject(kind, facts, i, spec.key, r, descs, index)
    rb = _content_subject(kind, facts, j, spec.key, r, descs, index)
    if ra is None or rb is None:
      return []
    (a, ha), (b, hb) = ra, rb
    how = {"refs": [ha, hb]}
  if refers == "title":
    text = _PAIR_TEMPLATES[op].format(a=a, b=b, noun=spec.noun, verb=spec.verb)
  else:  # long descriptions: state them first, then ask about "the two"
    text = (f"Take two {kind.content_noun}s: first, {a}; second, {b}. "
            + _PAIR_CONTENT_TEMPLATES[op].format(noun=spec.noun, verb=spec.verb))
  text = text[0].upper() + text[1:]
  subjects = [kind.subject(facts[k]) for k in range(len(facts))]
  if op in ("higher", "earlier"):
    first = (va > vb) if op == "higher" else (va < vb)
    answer = subjects[i] if first else subjects[j]
    wrong = [subjects[j] if first else subjects[i]]
    if refers == "content":  # the question does not name the two: other subjects are plausible
      others = [s for k, s in enumerate(subjects) if k not in (i, j)]
      wrong += r.sample(others, min(NUM_OPTIONS - 2, len(others)))
    aliases: list[str] = []
  else:
    x = abs(va - vb) if op == "difference" else va + vb
    answer = _fmt_like(x, fa[spec.key])
    # Plausible wrong answers: the other operation, each value alone, the same operation with a
    # third document's value; then numbers near the answer.
    cands = [va + vb if op == "difference" else abs(va - vb), va, vb]
    for k in r.sample(range(len(facts)), min(6, len(facts))):
      if k not in (i, j):
        vk = _num(facts[k][spec.key])
        cands.append(abs(va - vk) if op == "difference" else va + vk)
    wrong = []
    for c in cands:
      v = _fmt_like(c, fa[spec.key])
      if v != answer and v not in wrong:
        wrong.append(v)
    wrong = wrong[:NUM_OPTIONS - 1]
    step = 10 ** -(len(answer.split(".")[1].split(" ")[0].rstrip("%")) if "." in answer else 0)
    wrong, _ = fill_distractors(r, wrong, NUM_OPTIONS - 1, answer,
                                lambda rr: _fmt_like(max(step, x + step * rr.randint(-30, 30)),
                                                     fa[spec.key]), spec.key)
    aliases = [a_ for a_ in dict.fromkeys(_number_aliases(answer.lstrip("$£").replace(",", "")))
               if a_ and a_ != answer] + ([answer.lstrip("$£")] if answer[:1] in "$£" else [])
  idx = r.randrange(len(wrong) + 1)
  options = wrong[:idx] + [answer] + wrong[idx:]
  qid = f"{doc_ids[i]}/pair-{n:02d}/{spec.key}/{op}" + ("/content" if refers == "content" else "")
  meta = {"field": spec.key, "refers": refers, "docs": "pair", "op": op, **how}
  gold = (doc_ids[i], doc_ids[j])
  return [Question(qid=f"{qid}/mc", doc_id=gold[0], doc_ids=gold, kind="mc", question=text,
                   options=options, answer_index=idx, meta=meta),
          Question(qid=f"{qid}/short", doc_id=gold[0], doc_ids=gold, kind="short", question=text,
                   answer=answer, aliases=[a_ for a_ in dict.fromkeys(aliases) if a_ != answer],
                   meta=meta)]


def check_question_options(question_refs, pair_share) -> tuple[tuple[str, ...] | None, float]:
  """Validates the question-set options (ValueError naming the option); returns them normalized."""
  if question_refs is not None:
    if isinstance(question_refs, str):
      question_refs = tuple(x.strip() for x in question_refs.split(",") if x.strip())
    question_refs = tuple(question_refs)
    bad = [x for x in question_refs if x not in QUESTION_REFS]
    if not question_refs or bad or len(set(question_refs)) != len(question_refs):
      raise ValueError(f"question_refs={question_refs!r}: need a non-empty subset of {QUESTION_REFS} "
                       "(None: the kind's default)")
  if isinstance(pair_share, bool) or not isinstance(pair_share, (int, float)) or not 0 <= pair_share < 1:
    raise ValueError(f"pair_share={pair_share!r} must be a number in [0, 1) (the share of questions "
                     "that need two documents; 0 = none)")
  return question_refs, float(pair_share)


def iter_collection(num_docs: int, seed: int, kind: str = "patients",
                    words_per_doc: int | None = None, question_refs: tuple[str, ...] | None = None,
                    pair_share: float = 0.0) -> Iterator[tuple[Document, list[Question]]]:
  """Yields (document, its questions) for documents 0..num_docs-1, one at a time.

  words_per_doc: None gives each document its natural length (patients ~550-750 words,
  products ~350-500, minutes 1,000-4,000 approx tokens, a per-document target drawn from the
  seed); an int adds filler paragraphs (minutes: discussion items) until the document has at
  least that many whitespace-separated words (the fact sections are always present, so very small
  targets give the minimum length, ~450 words for patients, ~150 for products, ~550 for minutes).
  question_refs: how single-document questions refer to their document, a subset of ("title",
  "content"); None = the kind's default (patients, products: title only, as before the option
  existed; minutes: both).
  pair_share: the share of all questions that need two documents (0 = none; e.g. 0.25). A
  two-document question is yielded with the later of its two documents (the writer needs both
  before it).
  """
  k = _get_kind(kind)
  if words_per_doc is not None and words_per_doc < 0:
    raise ValueError(f"words_per_doc must be None or >= 0, got {words_per_doc}")
  question_refs, pair_share = check_question_options(question_refs, pair_share)
  refs = question_refs or k.default_refs
  facts = all_facts(num_docs, seed, kind)
  descs = index = None
  if k.descriptors is not None and "content" in refs:
    descs = [k.descriptors(f) for f in facts]
    index = _descriptor_index(descs)
  doc_ids = [f"{k.doc_prefix}-{i:05d}" for i in range(num_docs)]
  pending: dict[int, list[Question]] = {}
  if pair_share > 0 and num_docs < 2:
    logging.warning("pair_share=%s but the collection has one document: no two-document questions",
                    pair_share)
  for i, f in enumerate(facts):
    doc_id = doc_ids[i]
    title, text = k.render(f, _rng(kind, seed, "text", i), words_per_doc)
    doc = Document(doc_id=doc_id, title=title, text=text,
                   meta={"kind": kind, "index": i, "subject": k.subject(f),
                         "facts": {s.key: f[s.key] for s in k.fields}})
    qs = _questions(k, facts, i, doc_id, seed, kind, refs, descs, index)
    if pair_share > 0 and num_docs > 1:
      # Pairs owned by document i (it is their first gold document): as many MC + short pairs as
      # make `pair_share` of all questions, the partner any other document.
      want = pair_share / (1 - pair_share) * len(qs) / 2
      r = _rng(kind, seed, "pairs", i)
      num = int(want) + (r.random() < want - int(want))
      n = 0
      for _ in range(4 * num):
        if n == num:
          break
        j = r.randrange(num_docs - 1)
        j += j >= i
        got = _pair_question(k, facts, i, j, n, doc_ids, r, refs, descs, index)
        if got:
          pending.setdefault(max(i, j), []).extend(got)
          n += 1
    yield doc, qs + pending.pop(i, [])


def _meta(num_docs, seed, kind, words_per_doc, question_refs=None, pair_share=0.0) -> dict:
  meta = {"seed": seed, "generator": GENERATOR_NAME, "generator_version": GENERATOR_VERSION,
          "kind": kind, "num_docs": num_docs, "words_per_doc": words_per_doc}
  if question_refs is not None:
    meta["question_refs"] = list(question_refs)
  if pair_share:
    meta["pair_share"] = pair_share
  return meta


def default_name(num_docs: int, seed: int, kind: str) -> str:
  return f"synthetic-{kind}-n{num_docs}-s{seed}"


def generate_collection(num_docs: int, seed: int, kind: str = "patients",
                        words_per_doc: int | None = None, name: str | None = None,
                        question_refs: tuple[str, ...] | None = None,
                        pair_share: float = 0.0) -> Collection:
  """Builds a synthetic collection in memory (see module doc and `iter_collection`).
  Deterministic in (kind, seed, num_docs and the question options)."""
  question_refs, pair_share = check_question_options(question_refs, pair_share)
  docs, questions = [], []
  for d, qs in iter_collection(num_docs, seed, kind, words_per_doc, question_refs, pair_share):
    docs.append(d)
    questions.extend(qs)
  return Collection(name=name or default_name(num_docs, seed, kind), documents=docs,
                    questions=questions,
                    meta=_meta(num_docs, seed, kind, words_per_doc, question_refs, pair_share))


def write_synthetic_collection(path: str | os.PathLike, num_docs: int, seed: int,
                               kind: str = "patients", words_per_doc: int | None = None,
                               name: str | None = None,
                               question_refs: tuple[str, ...] | None = None,
                               pair_share: float = 0.0) -> dict:
  """Streams a synthetic collection straight to directory `path`; returns the manifest."""
  question_refs, pair_share = check_question_options(question_refs, pair_share)
  with CollectionWriter(path, name or default_name(num_docs, seed, kind),
                        meta=_meta(num_docs, seed, kind, words_per_doc, question_refs,
                                   pair_share)) as w:
    for d, qs in iter_collection(num_docs, seed, kind, words_per_doc, question_refs, pair_share):
      w.add_document(d)
      for q in qs:
        w.add_question(q)
  logging.info("Wrote synthetic collection %s: %d documents, %d questions, ~%d tokens", path,
               w.manifest["num_documents"], w.manifest["num_questions"],
               w.manifest["approx_num_tokens"])
  return w.manifest
