"""One small hierarchy of user-facing errors.

Every error the appliance raises on purpose carries a short title (what went wrong) and a hint
(what to do about it). The CLI prints both, the TUI shows them in a modal, and a job writes them
as an `error` event, so a user never has to read a traceback.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """An error with a user-facing title and a hint that says how to fix it."""

    title = "Something went wrong"

    def __init__(self, message: str, hint: str = "", *, title: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if title is not None:
            self.title = title

    def __str__(self) -> str:
        return f"{self.message}\nhint: {self.hint}" if self.hint else self.message


class ConfigError(ApplianceError):
    title = "Invalid configuration"


class StoreError(ApplianceError):
    title = "Model store problem"


class UnsafeWeightsError(StoreError):
    title = "Refused unsafe weights"


class ToolchainError(ApplianceError):
    title = "llama.cpp toolchain problem"


class EgressBlocked(ApplianceError):
    title = "Network access blocked"


class JobFailed(ApplianceError):
    title = "Job failed"


class Cancelled(ApplianceError):
    title = "Cancelled"
