"""Search queries over the mailbox: C{to:}, C{from:}, C{subject:}, plain words.

A query is what a developer types into the page's search box or passes to
C{GET /api/v1/search?query=} (Mailpit's filter syntax, the part that makes
sense without tags or read state): words separated by spaces, a C{"quoted
phrase"} as one word, a C{field:value} to look in one field only, and a
leading C{-} or C{!} to exclude.  Every term must match (AND); matching is
case-insensitive substring search.

Linear time: the query is cut at L{MAX_QUERY} characters and at
L{MAX_TERMS} terms, and each term is one substring search (C{str.find},
linear in the text for a needle this short) in text the store prepared
once per message, itself bounded (L{Haystack}).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_QUERY = 500
MAX_TERMS = 16
#: The fields a term can name, and the filters without a value.
FIELDS = ("from", "to", "cc", "bcc", "subject", "message-id", "has", "is")


@dataclass(frozen=True, slots=True)
class Term:
    """One condition: C{text} found in C{field} (None: anywhere), or not, if C{negated}."""

    field: str | None
    text: str
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Haystack:
    """What one message offers to search, lower-cased once when it is stored."""

    from_: str
    to: str
    cc: str
    bcc: str
    subject: str
    message_id: str
    body: str
    attachments: int

    def field(self, name: str) -> str:
        if name == "message-id":
            return self.message_id
        if name == "from":
            return self.from_
        value: str = getattr(self, name)
        return value


def parse_query(query: str) -> tuple[Term, ...]:
    """The terms of C{query}, in order; an empty query has none (matches everything)."""
    text = query[:MAX_QUERY]
    terms: list[Term] = []
    i, n = 0, len(text)
    while i < n and len(terms) < MAX_TERMS:
        if text[i].isspace():
            i += 1
            continue
        negated = text[i] in "-!"
        if negated:
            i += 1
        field: str | None = None
        # A field name is letters and "-" up to a colon; look no further than
        # the longest name, so a long word is not scanned twice.
        colon = text.find(":", i, i + 12)
        if colon > i and text[i:colon].lower() in FIELDS:
            field = text[i:colon].lower()
            i = colon + 1
        if i < n and text[i] == '"':
            end = text.find('"', i + 1)
            end = n if end < 0 else end
            value = text[i + 1 : end]
            i = end + 1
        else:
            start = i
            while i < n and not text[i].isspace():
                i += 1
            value = text[start:i]
        value = value.strip().lower()
        if value:
            terms.append(Term(field, value, negated))
    return tuple(terms)


def matches(terms: tuple[Term, ...], haystack: Haystack, read: bool = False) -> bool:
    """Does a message with C{haystack} (opened already when C{read}) satisfy every term?"""
    for term in terms:
        if term.field == "has":
            found = term.text.startswith("attachment") and haystack.attachments > 0
        elif term.field == "is":
            # Tags and the rest of Mailpit's states are not kept (docs/mailbox.md).
            found = (term.text == "read" and read) or (term.text == "unread" and not read)
        elif term.field is not None:
            found = term.text in haystack.field(term.field)
        else:
            found = any(
                term.text in part
                for part in (
                    haystack.subject,
                    haystack.from_,
                    haystack.to,
                    haystack.cc,
                    haystack.body,
                )
            )
        if found == term.negated:
            return False
    return True
