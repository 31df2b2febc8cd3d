"""The one base class of every error a user can act on.

Stages and the CLI catch `UserError` (one line on stderr, exit 2) and nothing broader, so a
real bug still ends in a traceback instead of hiding behind a tidy message.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in settings, data or usage; the message says what to change."""
