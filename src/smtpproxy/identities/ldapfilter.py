"""The LDAP search filter for one user: the configured template, the name escaped.

RFC 4515 section 3: in a filter's assertion value the characters C{*},
C{(}, C{)}, C{\\} and NUL must be written as C{\\2a}, C{\\28}, C{\\29},
C{\\5c} and C{\\00}.  Without that, a user name such as C{*)(uid=*} turns
"this user" into "any user" (LDAP injection).  Everything else, UTF-8
included, may stand as it is.  Pure and linear: one pass over the name.
"""

from __future__ import annotations

PLACEHOLDER = "%s"
_ESCAPES = {"*": "\\2a", "(": "\\28", ")": "\\29", "\\": "\\5c", "\x00": "\\00"}
MAX_USER_CHARS = 256


def escape_value(value: str) -> str:
    """C{value} safe to place in a filter's assertion value (RFC 4515)."""
    return "".join(_ESCAPES.get(c, c) for c in value)


def user_filter(template: str, user: str) -> str:
    """The template with every C{%s} replaced by the escaped user name."""
    return template.replace(PLACEHOLDER, escape_value(user))
