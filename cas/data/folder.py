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


DEFAULT_MAX_BYTES = 32 << 20  # 32 MiB of text (~8M tokens): far beyond any one cartridge's document
_UTF16_32_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32-LE"), (b"\x00\x00\xfe\xff", "UTF-32-BE"),
                  (b"\xff\xfe", "UTF-16-LE"), (b"\xfe\xff", "UTF-16-BE"))
_TEXT_CONTROLS = set(b"\t\n\r\f\v\x1b")


def _binary_reason(data: bytes) -> str | None:
  """Why `data` is not text (NUL bytes, or mostly control bytes), or None."""
  nul = data.find(b"\x00")
  if nul >= 0:
    return f"it contains NUL bytes (first at byte offset {nul})"
  head = data[:65536]
  ctrl = sum(1 for b in head if b < 32 and b not in _TEXT_CONTROLS)
  if head and ctrl > 0.05 * len(head):
    return f"{ctrl} of its first {len(head)} bytes are control characters"
  return None


def read_text_file(path: str, errors: Literal["strict", "replace"] = "strict",
                   max_bytes: int | None = DEFAULT_MAX_BYTES) -> str:
  """Reads a UTF-8 text file (a leading BOM is dropped).

  Raises `CollectionError` naming the file when it is larger than `max_bytes` (None: no limit),
  starts with a UTF-16/UTF-32 byte-order mark (another encoding), looks binary (NUL bytes or
  mostly control characters: e.g. an image or PDF saved as .txt), or is not valid UTF-8:
  errors="strict" names the byte offset of the first invalid byte; "replace" substitutes U+FFFD.
  """
  if errors not in ("strict", "replace"):
    raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
  size = os.path.getsize(path)
  if max_bytes is not None and size > max_bytes:
    raise CollectionError(f"{path}: {size} bytes, more than the limit of {max_bytes} bytes for one "
                          f"document; split it into several documents or raise max_bytes")
  with open(path, "rb") as f:
    data = f.read()
  for bom, enc in _UTF16_32_BOMS:
    if data.startswith(bom):
      raise CollectionError(f"{path}: the file is {enc} encoded (byte-order mark {bom.hex()}), not "
                            f"UTF-8; convert it, e.g. `iconv -f {enc} -t UTF-8`")
  why = _binary_reason(data)
  if why:
    raise CollectionError(f"{path}: looks like a binary file, not text: {why}")
  try:
    text = data.decode("utf-8", errors=errors)
  except UnicodeDecodeError as e:
    raise CollectionError(
        f"{path}: not valid UTF-8 at byte offset {e.start} (byte 0x{data[e.start]:02x}: "
        f"{e.reason}); convert the file to UTF-8 or pass errors='replace'") from None
  return text.removeprefix("\ufeff")


def load_folder(path: str | os.PathLike, name: str | None = None,
                extensions: Sequence[str] = DEFAULT_EXTENSIONS,
                errors: Literal["strict", "replace"] = "strict",
                max_bytes: int | None = DEFAULT_MAX_BYTES) -> Collection:
  """Reads every file under `path` whose name ends in one of `extensions` as one Document.

  Files with other extensions (images, PDFs, ...) are skipped. Raises CollectionError when the
  folder does not exist, has no matching files, or a matching file is empty (or whitespace
  only), larger than `max_bytes`, UTF-16/32 encoded, binary, or not valid UTF-8 (unless
  errors="replace"); the message names every such file (and for bad UTF-8 the byte offset).
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
  docs, bad = [], []  # every unreadable file is named, not only the first one met
  for fpath in files:
    rel = os.path.relpath(fpath, root).replace(os.sep, "/")
    try:
      text = read_text_file(fpath, errors=errors, max_bytes=max_bytes)
    except CollectionError as e:
      bad.append(str(e))
      continue
    if not text.strip():
      bad.append(f"{fpath}: empty file (no text besides whitespace)")
      continue
    stem = os.path.splitext(os.path.basename(fpath))[0]
    docs.append(Document(doc_id=rel, title=_title(text, stem), text=text,
                         meta={"source_path": os.path.abspath(fpath)}))
  if len(bad) == 1:
    raise CollectionError(bad[0])
  if bad:
    raise CollectionError(f"{root}: {len(bad)} of {len(files)} files cannot be documents:\n"
                          + "\n".join(f"  - {b}" for b in bad))
  return Collection(name=name or os.path.basename(os.path.abspath(root)), documents=docs,
                    meta={"source": "folder", "folder": os.path.abspath(root)})
