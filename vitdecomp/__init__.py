"""vitdecomp: exact per-component decomposition of vision-model representations."""
from .engine import Decomposition, components_for, decompose
from .errors import InputError, UnknownModelError, UnsupportedModuleError, VitdecompError
from .models import LoadedModel, load_model, supported_models
from .names import Component
from . import compalign
from .storage import Store, open_store

__version__ = "0.1.0"

__all__ = [
    "Component", "Decomposition", "InputError", "LoadedModel", "UnknownModelError", "UnsupportedModuleError",
    "Store", "VitdecompError", "components_for", "decompose", "load_model", "open_store", "supported_models",
    "__version__",
]
