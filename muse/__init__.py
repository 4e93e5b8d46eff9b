"""MUSE: multi-tenant score serving for fraud models.

This module is the only public import path; everything else is private.
"""

from muse._errors import *  # noqa: F403 - the error types are part of the API
from muse._errors import __all__ as _error_names

__all__ = [*_error_names]
