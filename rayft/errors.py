"""The one exception type the CLI turns into a clean message instead of a traceback."""


class RayftError(Exception):
    """A problem the user can fix; the message says where it is and what to do."""
