"""Exceptions raised by vitdecomp. Every message says what went wrong, where, and how to fix it."""
from __future__ import annotations


class VitdecompError(Exception):
    """Base class of every error vitdecomp raises on purpose."""


class UnknownModelError(VitdecompError, ValueError):
    """A model name, weights tag or checkpoint that cannot be resolved."""


class UnsupportedModuleError(VitdecompError, NotImplementedError):
    """The model contains a module the engine has no exact rule for."""


class InputError(VitdecompError, ValueError):
    """Bad input to a public function (image tensor shape, option values, component names)."""
