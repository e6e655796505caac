"""Errors of merge and export; both reach the user as a clean `rayft:` message."""

from rayft.errors import RayftError


class ExportError(RayftError):
    """An adapter, base or merged model that cannot be merged or exported as asked."""


class VerificationError(RayftError):
    """Merged or exported weights whose outputs drift from the reference beyond the threshold."""
