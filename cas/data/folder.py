"""A folder of text files (.txt, .md) as a `Collection` (documents only, no questions).

doc_id is the file's path relative to the folder, with '/' separators (e.g. "notes/visit1.md");
the title is the first Markdown heading ("# Title", any level) of the file, else the file name
without its extension. Files are read in sorted path order, recursively; hidden files and folders
(names starting with '.') are skipped.
"""
from __future__ import annotations

import os
import re
from typing import Literal, Sequence

from cas.data.types import Collection, CollectionError, Document

DEFAULT_EXTENSIONS = (".txt", ".md")
_HEADING_RE = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")


def _title(text: str, fallback: str) -> str:
  for line in text.splitlines():
    m = _HEADING_RE.match(line)
    if m:
      return m.group(1)
  return fallback


def read_text_file(path: str, errors: Literal["strict", "replace"] = "strict") -> str:
  """Reads a UTF-8 text file (a leading BOM is dropped).

  errors="strict" raises `CollectionError` naming the file and the byte offset of the first
  invalid byte; "replace" substitutes U+FFFD for invalid bytes.
  """
  if errors not in ("strict", "replace"):
    raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8", errors=errors)
  except UnicodeDecodeError as e:
    raise CollectionError(
        f"{path}: not valid UTF-8 at byte offset {e.start} (byte 0x{data[e.start]:02x}: "
        f"{e.reason}); convert the file to UTF-8 or pass errors='replace'") from None
  return text.removeprefix("\ufeff")


def load_folder(path: str | os.PathLike, name: str | None = None,
                extensions: Sequence[str] = DEFAULT_EXTENSIONS,
                errors: Literal["strict", "replace"] = "strict") -> Collection:
  """Reads every file under `path` whose name ends in one of `extensions` as one Document.

  Raises CollectionError when the folder does not exist, has no matching files, or a file is
  empty (or whitespace only) or not valid UTF-8 (unless errors="replace"); the message names the
  file (and for bad UTF-8 the byte offset).
  """
  root = os.fspath(path)
  if not os.path.isdir(root):
    raise CollectionError(f"{root}: not a folder")
  exts = tuple(e.lower() for e in extensions)
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for fn in filenames:
      if not fn.startswith(".") and fn.lower().endswith(exts):
        files.append(os.path.join(dirpath, fn))
  files.sort(key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))
  if not files:
    raise CollectionError(f"{root}: no files with extensions {list(exts)} (searched recursively)")
  docs = []
  for fpath in files:
    rel = os.path.relpath(fpath, root).replace(os.sep, "/")
    text = read_text_file(fpath, errors=errors)
    if not text.strip():
      raise CollectionError(f"{fpath}: empty file (no text besides whitespace)")
    stem = os.path.splitext(os.path.basename(fpath))[0]
    docs.append(Document(doc_id=rel, title=_title(text, stem), text=text,
                         meta={"source_path": os.path.abspath(fpath)}))
  return Collection(name=name or os.path.basename(os.path.abspath(root)), documents=docs,
                    meta={"source": "folder", "folder": os.path.abspath(root)})
