"""Errors and warnings users see from mmaccel."""
from __future__ import annotations

import warnings


class InvalidOptionError(ValueError):
    """An unknown option or a bad option value: the message names the option and the valid choices."""


class LossyPassError(RuntimeError):
    """A lossy pass the user asked for could not run (e.g. a calibration sample does not fit the graph): the
    compile or export stops rather than quietly giving an unoptimized model; option lossy_fallback=True
    turns this into a warning."""


class MmaccelFallbackWarning(UserWarning):
    """A graph (or one pass) ran unoptimized; the message says why."""


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Warn with `message` the first time it is seen in this process (one clear warning per reason)."""
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn(message, MmaccelFallbackWarning, stacklevel=3)


class ReleasedWeightsError(RuntimeError):
    """Something needs full-precision weights that weights="release" freed: an eager call of the module, or a
    new graph (a recompile) that cannot be rebuilt from the quantized weights earlier graphs made. The message
    names the fix; nothing runs on the freed storage."""
