"""The contribution store (one row per image, one vector column per component) and its manifest.

Layout, commits and the reader API are described in :mod:`vitdecomp.store.store`. Without Ray::

    st = Store.create(path, Manifest.build(lm, vd.components_for(lm), options))
    st.append(vd.decompose(lm, x), ids=[...], columns={"label": [...]})
"""
from .manifest import MANIFEST, Manifest, ManifestOptions, ModelInfo, manifest_hash
from .schema import arrow_to_vectors, column_for, contributions_schema, vectors_to_arrow
from .store import FORMATS, Store, StoreBatch, StoreError, open_store

__all__ = ["FORMATS", "MANIFEST", "Manifest", "ManifestOptions", "ModelInfo", "Store", "StoreBatch", "StoreError",
           "arrow_to_vectors", "column_for", "contributions_schema", "manifest_hash", "open_store", "vectors_to_arrow"]
