"""Names clients choose: models, predictors, tenants, intents.

They become file names in the registry and path segments in URLs, so one
rule covers them all.
"""

from __future__ import annotations

import re

from muse._errors import BadRequest

__all__ = ["check_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(kind: str, name: str) -> str:
    """Refuse names that cannot be a file name and a URL segment.

    Raises:
        BadRequest: naming the kind of name and the rule.
    """
    if type(name) is not str or not _NAME.match(name):
        raise BadRequest(
            f"{kind} name {name!r} must be 1-64 letters, digits, '.', '_' or '-'"
        )
    return name
