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

Kinds: "patients" (hospital discharge summaries) and "products" (product specification sheets).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import random
from typing import Callable, Iterator

from absl import logging

from cas.data.types import Collection, CollectionWriter, Document, Question

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


# =============================================================================== engine


@dataclasses.dataclass(frozen=True)
class _Kind:
  fields: list[FieldSpec]
  names: Callable[[int, int], list[tuple[str, str]]]
  facts: Callable[[int, int, str, str], Facts]
  render: Callable[[Facts, random.Random, int | None], tuple[str, str]]
  subject: Callable[[Facts], str]
  doc_prefix: str


KINDS = {
    "patients": _Kind(_PATIENT_FIELDS, _patient_names, _patient_facts, _render_patient,
                      lambda f: f["name"], "patient"),
    "products": _Kind(_PRODUCT_FIELDS, _product_names, _product_facts, _render_product,
                      lambda f: f["name"], "product"),
}


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
  from_docs = len(out)
  tries = 0
  while len(out) < n:
    v = spec.sample(r)
    if v != answer and v not in out:
      out.append(v)
    tries += 1
    if tries > 10000:
      raise RuntimeError(f"cannot find {n} distinct distractors for field {spec.key!r}")
  source = "documents" if from_docs == n else ("pool" if from_docs == 0 else "mixed")
  return out, source


def _questions(kind: _Kind, facts: list[Facts], i: int, doc_id: str, seed: int,
               kind_name: str) -> list[Question]:
  f = facts[i]
  r = _rng(kind_name, seed, "questions", i)
  subject = kind.subject(f)
  out = []
  for spec in kind.fields:
    answer = f[spec.key]
    text = spec.question.format(subject=subject)
    distractors, source = _distractors(r, facts, i, spec, NUM_OPTIONS - 1)
    idx = r.randrange(NUM_OPTIONS)
    options = distractors[:idx] + [answer] + distractors[idx:]
    meta = {"field": spec.key}
    out.append(Question(qid=f"{doc_id}/{spec.key}/mc", doc_id=doc_id, kind="mc", question=text,
                        options=options, answer_index=idx,
                        meta={**meta, "distractor_source": source}))
    aliases = [a for a in dict.fromkeys(spec.aliases(answer)) if a and a != answer]
    out.append(Question(qid=f"{doc_id}/{spec.key}/short", doc_id=doc_id, kind="short",
                        question=text, answer=answer, aliases=aliases, meta=meta))
  return out


def iter_collection(num_docs: int, seed: int, kind: str = "patients",
                    words_per_doc: int | None = None) -> Iterator[tuple[Document, list[Question]]]:
  """Yields (document, its questions) for documents 0..num_docs-1, one at a time.

  words_per_doc: None gives each document its natural length (patients ~550-750 words,
  products ~350-500); an int adds filler paragraphs until the document has at least that many
  whitespace-separated words (the fact sections are always present, so very small targets give
  the minimum length, ~450 words for patients, ~150 for products).
  """
  k = _get_kind(kind)
  if words_per_doc is not None and words_per_doc < 0:
    raise ValueError(f"words_per_doc must be None or >= 0, got {words_per_doc}")
  facts = all_facts(num_docs, seed, kind)
  for i, f in enumerate(facts):
    doc_id = f"{k.doc_prefix}-{i:05d}"
    title, text = k.render(f, _rng(kind, seed, "text", i), words_per_doc)
    doc = Document(doc_id=doc_id, title=title, text=text,
                   meta={"kind": kind, "index": i, "subject": k.subject(f),
                         "facts": {s.key: f[s.key] for s in k.fields}})
    yield doc, _questions(k, facts, i, doc_id, seed, kind)


def _meta(num_docs, seed, kind, words_per_doc) -> dict:
  return {"seed": seed, "generator": GENERATOR_NAME, "generator_version": GENERATOR_VERSION,
          "kind": kind, "num_docs": num_docs, "words_per_doc": words_per_doc}


def default_name(num_docs: int, seed: int, kind: str) -> str:
  return f"synthetic-{kind}-n{num_docs}-s{seed}"


def generate_collection(num_docs: int, seed: int, kind: str = "patients",
                        words_per_doc: int | None = None, name: str | None = None) -> Collection:
  """Builds a synthetic collection in memory (see module doc). Deterministic in (kind, seed)."""
  docs, questions = [], []
  for d, qs in iter_collection(num_docs, seed, kind, words_per_doc):
    docs.append(d)
    questions.extend(qs)
  return Collection(name=name or default_name(num_docs, seed, kind), documents=docs,
                    questions=questions, meta=_meta(num_docs, seed, kind, words_per_doc))


def write_synthetic_collection(path: str | os.PathLike, num_docs: int, seed: int,
                               kind: str = "patients", words_per_doc: int | None = None,
                               name: str | None = None) -> dict:
  """Streams a synthetic collection straight to directory `path`; returns the manifest."""
  with CollectionWriter(path, name or default_name(num_docs, seed, kind),
                        meta=_meta(num_docs, seed, kind, words_per_doc)) as w:
    for d, qs in iter_collection(num_docs, seed, kind, words_per_doc):
      w.add_document(d)
      for q in qs:
        w.add_question(q)
  logging.info("Wrote synthetic collection %s: %d documents, %d questions, ~%d tokens", path,
               w.manifest["num_documents"], w.manifest["num_questions"],
               w.manifest["approx_num_tokens"])
  return w.manifest
