"""Tests for cas/data/folder.py: a folder of .txt/.md files as a Collection."""
import pytest

from cas.data.folder import load_folder
from cas.data.types import CollectionError


def _write(path, data: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def test_folder_collection(tmp_path):
  _write(tmp_path / "b.txt", b"Plain text notes.\nSecond line.")
  _write(tmp_path / "sub" / "a.md", "Intro line\n\n## Ward Round Notes ##\nBody \u00e9.".encode())
  _write(tmp_path / "sub" / "deeper" / "c.MD", b"# Title C\ntext")
  _write(tmp_path / "ignored.pdf", b"%PDF")
  _write(tmp_path / ".hidden.txt", b"secret")
  _write(tmp_path / ".git" / "x.txt", b"repo internals")
  _write(tmp_path / "bom.txt", b"\xef\xbb\xbfwith bom")
  c = load_folder(tmp_path, name="notes")
  assert c.name == "notes"
  assert c.doc_ids == ["b.txt", "bom.txt", "sub/a.md", "sub/deeper/c.MD"]
  titles = {d.doc_id: d.title for d in c.documents}
  assert titles == {"b.txt": "b", "bom.txt": "bom", "sub/a.md": "Ward Round Notes",
                    "sub/deeper/c.MD": "Title C"}
  assert c.document("sub/a.md").text.endswith("Body \u00e9.")
  assert c.document("bom.txt").text == "with bom"
  assert c.questions == []


def test_non_utf8_names_file_and_offset(tmp_path):
  _write(tmp_path / "good.txt", b"fine")
  _write(tmp_path / "bad.txt", b"hello \xff world")
  with pytest.raises(CollectionError, match=r"bad\.txt: not valid UTF-8 at byte offset 6"):
    load_folder(tmp_path)
  c = load_folder(tmp_path, errors="replace")
  assert c.document("bad.txt").text == "hello \ufffd world"


def test_empty_file_named(tmp_path):
  _write(tmp_path / "ok.md", b"# x\ny")
  _write(tmp_path / "blank.txt", b" \n\n ")
  with pytest.raises(CollectionError, match=r"blank\.txt: empty file"):
    load_folder(tmp_path)


def test_no_files(tmp_path):
  _write(tmp_path / "data.csv", b"a,b")
  with pytest.raises(CollectionError, match="no files with extensions"):
    load_folder(tmp_path)
  with pytest.raises(CollectionError, match="not a folder"):
    load_folder(tmp_path / "missing")


def test_custom_extensions(tmp_path):
  _write(tmp_path / "x.rst", b"Restructured")
  _write(tmp_path / "y.txt", b"Plain")
  assert load_folder(tmp_path, extensions=(".rst",)).doc_ids == ["x.rst"]
