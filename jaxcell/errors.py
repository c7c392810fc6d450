"""The one exception type for mistakes a user can fix (bad paths, names, files).

The CLI prints these as one line and exits non-zero, without a traceback; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    pass
