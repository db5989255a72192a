"""User-facing errors: one clear line plus a hint, never a traceback (unless --debug)."""


class FlipbackError(Exception):
    """An error whose message is meant for the user."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class DataError(FlipbackError):
    """The data set cannot be used as given."""


class ModelError(FlipbackError):
    """The model cannot be loaded or does not fit the data."""


class RunError(FlipbackError):
    """A run folder or run configuration problem."""


class SettingsChanged(RunError):
    """A run folder holds a run made with other settings, so it cannot be resumed."""
