"""Serving cartridges: an engine that batches chat requests with cartridges (loaded through an
LRU device cache from a cartridge store, or chosen by a retriever), an OpenAI-compatible HTTP API
(`cas.serve.api`, needs fastapi + uvicorn) and a terminal chat (`cas.serve.chat`).

    python -m launch.serve --workdir=runs/cas_quick --port=8000
    python -m launch.chat --workdir=runs/cas_quick --cartridges=doc_3
"""
from cas.serve.cartridges import CartridgeCache, Collection, open_collections, store_of_workdir
from cas.serve.decode import Row, StepDecoder
from cas.serve.engine import ChatRequest, Engine, Event, Prepared, ServeError

__all__ = ["CartridgeCache", "ChatRequest", "Collection", "Engine", "Event", "Prepared", "Row",
           "ServeError", "StepDecoder", "open_collections", "store_of_workdir"]
