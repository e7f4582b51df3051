"""The contribution store (one row per image, one vector column per component) and its manifest.

Layout, commits and the reader API are described in :mod:`vitdecomp.store.store`.
"""
from .manifest import MANIFEST, manifest_hash
from .schema import arrow_to_vectors, column_for, contributions_schema, vectors_to_arrow
from .store import FORMATS, Store, StoreBatch, StoreError, open_store

__all__ = ["FORMATS", "MANIFEST", "Store", "StoreBatch", "StoreError", "arrow_to_vectors", "column_for",
           "contributions_schema", "manifest_hash", "open_store", "vectors_to_arrow"]
