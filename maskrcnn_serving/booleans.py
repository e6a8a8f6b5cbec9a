"""The one reading of a boolean written as text, shared by the settings (environment variables, ``serve`` flags) and
the request options given as text (query parameters, SageMaker custom attributes).

Accepted, in any letter case and with surrounding whitespace ignored: ``1``, ``true``, ``yes``, ``on`` for true and
``0``, ``false``, ``no``, ``off`` for false. This module imports nothing of the package, so every layer may use it.
"""

from __future__ import annotations

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """``text`` as a boolean; ValueError (naming the accepted words) for anything else."""
    value = text.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")
