"""One exception root for everything AppPot reports to users."""


class AppPotError(Exception):
    """A failure the user can act on: a one-line message plus a hint.

    Messages are lower-case, name the thing and its value; the CLI prints
    ``error: <message>`` and ``hint: <hint>``.
    """

    status = 125  # apppot.status.APPPOT_ERROR

    def __init__(self, message, *, hint=None, details=None):
        super().__init__(message)
        self.hint = hint
        self.details = details

    def __str__(self):
        msg = super().__str__()
        cause = self.__cause__
        if cause is not None and str(cause) and str(cause) not in msg:
            return f"{msg} ({cause})"
        return msg


class ConfigError(AppPotError):
    """Bad option, environment variable or input file."""


class KernelError(AppPotError):
    """The UML kernel is missing, not a UML kernel, or lacks a feature."""


class ImageError(AppPotError):
    """An appliance image (or its COW file) is missing or unusable."""


class BuildError(AppPotError):
    """Building an appliance image failed."""


class ApplianceError(AppPotError):
    """A running appliance failed: boot failure, guest crash, timeout."""

    def __init__(self, message, *, status, hint=None, details=None):
        super().__init__(message, hint=hint, details=details)
        self.status = status
