"""Which Ray node runs a stage (reported in the job summary)."""
from __future__ import annotations

from typing import Optional


def node_id() -> Optional[str]:
    """The Ray node this code runs on (None outside Ray: unit tests call the stages directly)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
