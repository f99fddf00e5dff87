"""Talk to a collection of cartridges in the terminal (streamed answers, history kept).

  python -m launch.chat --workdir=runs/cas_quick --cartridges=doc_3,doc_7
  python -m launch.chat --workdir=runs/cas_quick               # retrieval picks --top_k cartridges
  echo "What is the capital?" | python -m launch.chat --workdir=runs/cas_quick --cartridges=doc_3

Commands: /reset, /quit (see cas/serve/chat.py).
"""
import sys

from absl import flags, logging

from launch import serve_flags
from launch.entry import run

CARTRIDGES = flags.DEFINE_list("cartridges", [], "Doc ids whose cartridges to load (of --collection, or "
                               "the first collection); empty: retrieval chooses --top_k per message.")
COLLECTION = flags.DEFINE_string("collection", None, "Collection name (default: the first served).")
SYSTEM = flags.DEFINE_string("system", None, "A system message for the conversation.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
POSITION_MODE = flags.DEFINE_enum("position_mode", "shared", ["shared", "sequential"],
                                  "How several cartridges are positioned.")


def main(argv):
  del argv
  from cas.serve.chat import chat_loop

  logging.set_verbosity(logging.WARNING)  # the terminal is for the conversation
  serve_flags.quiet_orbax()
  engine = serve_flags.build_engine()
  try:
    coll = engine.collections.get(COLLECTION.value) if COLLECTION.value else engine.default_collection
    retrieve = not CARTRIDGES.value and coll is not None and coll.retriever is not None
    chat_loop(engine, cartridges=CARTRIDGES.value, collection=COLLECTION.value,
              top_k=serve_flags.TOP_K.value if retrieve else None, system=SYSTEM.value,
              temperature=TEMPERATURE.value, max_tokens=None, position_mode=POSITION_MODE.value,
              stdin=sys.stdin, stdout=sys.stdout)
  finally:
    engine.close()


if __name__ == "__main__":
  run(main)
