"""Progress events: long-running core functions report dicts with an "event" key to a callback."""

from __future__ import annotations

from collections.abc import Callable

Callback = Callable[[dict], None]
