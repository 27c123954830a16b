"""Bad inputs (unreadable image, malformed CSV row, missing file): raise, or skip and warn once."""

from __future__ import annotations

import warnings


class BadDataError(ValueError):
    """A file or row of a data set that cannot be used; the message names it."""


class BadItems:
    """Collects the bad items of one load.

    With ``skip_bad=False`` the first report raises :class:`BadDataError`; with ``skip_bad=True``
    reports are kept and :meth:`warn` emits one warning counting them, so a skipped item is
    never silent and a wrong label never enters the data.
    """

    def __init__(self, dataset: str, skip_bad: bool):
        self.dataset = dataset
        self.skip_bad = skip_bad
        self.items: list[str] = []

    def report(self, where: str, reason: str) -> None:
        """Record that ``where`` (a file, or ``"file, row N"``) is unusable because of ``reason``."""
        message = f"{where}: {reason}"
        if not self.skip_bad:
            raise BadDataError(f"{self.dataset}: {message} (pass skip_bad=True to skip bad items)")
        self.items.append(message)

    def warn(self) -> None:
        """One warning for everything skipped so far (nothing when all was well)."""
        if self.items:
            shown = "; ".join(self.items[:5]) + (f"; ... ({len(self.items) - 5} more)" if len(self.items) > 5 else "")
            warnings.warn(f"{self.dataset}: skipped {len(self.items)} bad item(s): {shown}", stacklevel=3)
