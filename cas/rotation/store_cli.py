"""The cartridge store's command line (python -m cas.rotation.store runs it):

  python -m cas.rotation.store --upgrade PATH   convert a format-1 store in place to format 2
                                                (cas.rotation.store_upgrade)
  python -m cas.rotation.store --info PATH      print the store's metadata and sizes

Apart from cas.rotation.store so that the store does not import its upgrade (which imports the store).
"""
from __future__ import annotations

import json
from typing import Sequence

from cas.rotation.store import open_store, read_store_meta
from cas.rotation.store_upgrade import upgrade_v1


def main(argv: Sequence[str] | None = None) -> int:
  import argparse
  ap = argparse.ArgumentParser(prog="python -m cas.rotation.store",
                               description="Cartridge store maintenance.")
  ap.add_argument("--upgrade", metavar="PATH", help="convert a format-1 store in place to format 2 (atomic)")
  ap.add_argument("--info", metavar="PATH", help="print the store's metadata and sizes")
  a = ap.parse_args(argv)
  if a.upgrade:
    print(json.dumps(upgrade_v1(a.upgrade), indent=2))
    return 0
  if a.info:
    with open_store(a.info, read_only=True) as st:
      print(json.dumps({"meta": read_store_meta(a.info), **st.stats(), "snapshots": st.snapshots()}, indent=2))
    return 0
  ap.print_help()
  return 2
