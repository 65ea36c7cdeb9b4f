"""Error types: every failure a user can cause raises a subclass of MedLSAMError with a clear message."""


class MedLSAMError(Exception):
    """Base class of all errors raised on bad input, bad weights or bad templates."""


class InvalidImageError(MedLSAMError):
    """The image cannot be read or is not a usable 3D CT scan."""


class CheckpointError(MedLSAMError):
    """A model checkpoint is missing, unreadable or does not match the architecture."""


class TemplateError(MedLSAMError):
    """Template labels, extreme points or a template bank are unusable."""
