"""Document collections: types and JSONL storage, the synthetic generator, folders of text files,
token chunking, and benchmark readers (LongHealth, QuALITY, QASPER).

The tfds builders live in `cas.data.tfds_builders` (imported on demand: it imports tfds).
"""
from cas.data.chunking import chunk_token_ids, sample_chunk
from cas.data.folder import load_folder
from cas.data.synthetic import generate_collection, iter_collection, write_synthetic_collection
from cas.data.types import (Collection, CollectionError, CollectionWriter, Document, Question,
                            approx_num_tokens, iter_documents, iter_questions, load_collection,
                            read_manifest, save_collection, write_collection)

__all__ = [
    "Collection", "CollectionError", "CollectionWriter", "Document", "Question",
    "approx_num_tokens", "chunk_token_ids", "generate_collection", "iter_collection",
    "iter_documents", "iter_questions", "load_collection", "load_folder", "read_manifest",
    "sample_chunk", "save_collection", "write_collection", "write_synthetic_collection",
]
