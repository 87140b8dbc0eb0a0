"""Search queries over the mailbox: C{to:}, C{from:}, C{subject:}, plain words.

A query is what a developer types into the page's search box or passes to
C{GET /api/v1/search?query=} (Mailpit's filter syntax, the part that makes
sense without tags or read state): words separated by spaces, a C{"quoted
phrase"} as one word, a C{field:value} to look in one field only, and a
leading C{-} or C{!} to exclude.  Every term must match (AND); matching is
case-insensitive substring search.

Linear time: at most L{MAX_QUERY} characters are read and at most
L{MAX_TERMS} terms kept, and each term is one substring search (C{str.find},
linear in the text for a needle this short) in text the store prepared
once per message, itself bounded (L{Haystack}).

A query past those limits is never narrowed silently: L{parse} says it was
cut (L{Query.cut}), and which pieces stated no condition (a lone quote,
C{subject:} without a value, C{is:} with a state not kept here), so the
API can refuse a search, and above all a delete by search, that would
otherwise match more than was asked (docs/mailbox.md).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_QUERY = 500
MAX_TERMS = 16
#: The fields a term can name, and the filters without a value.
FIELDS = ("from", "to", "cc", "bcc", "subject", "message-id", "has", "is")
#: The values the two filters understand (C{is:tagged} is known: no message has tags here).
FILTER_VALUES = {
    "has": ("attachment", "attachments"),
    "is": ("read", "unread", "tagged"),
}
#: Characters of an unusable piece quoted back in an error.
_SHOWN = 40


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


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: its terms, and what of the text did not become one.

    @ivar cut: why the terms are only the query's beginning (past L{MAX_QUERY}
        characters or L{MAX_TERMS} terms), or None when all of it was read.
    @ivar vague: the pieces that state no condition this mailbox can apply,
        as typed (clipped): a lone quote or C{-}, a field without a value,
        C{is:} or C{has:} with a value it does not know.  A search skips them.
    """

    terms: tuple[Term, ...]
    cut: str | None = None
    vague: tuple[str, ...] = ()

    def refusal(self, deleting: bool) -> str | None:
        """Why the API should answer 400 rather than run this query, or None.

        A search that was cut would list what the missing tail excluded; a
        delete by search must also say what to delete, all of it understood,
        since it removes what it matches for good.
        """
        if self.cut is not None:
            return f"the query is past the search limits ({self.cut}); shorten it"
        if not deleting:
            return None
        if self.vague:
            shown = ", ".join(repr(piece) for piece in self.vague[:3])
            return f"the query has parts that state no condition ({shown}); nothing was deleted"
        if not self.terms:
            return "the query states no condition; nothing was deleted"
        return None


def parse(query: str) -> Query:
    """Read C{query} into terms, reporting a cut and the pieces that mean nothing.

    The whole of the first L{MAX_QUERY} characters is read, so a query with
    more than L{MAX_TERMS} terms is known to be one.
    """
    cut = None
    if len(query) > MAX_QUERY and query[MAX_QUERY:].strip():
        cut = f"more than {MAX_QUERY} characters"
    text = query[:MAX_QUERY]
    terms: list[Term] = []
    vague: list[str] = []
    found = 0
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        piece_start = i
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
        known = FILTER_VALUES.get(field or "")
        if not value or (known is not None and value not in known):
            vague.append(text[piece_start:i][:_SHOWN])
            continue
        found += 1
        if found <= MAX_TERMS:
            terms.append(Term(field, value, negated))
    if found > MAX_TERMS and cut is None:
        cut = f"more than {MAX_TERMS} terms"
    return Query(tuple(terms), cut, tuple(vague))


def parse_query(query: str) -> tuple[Term, ...]:
    """The terms of C{query}, in order; an empty query has none (matches everything).

    What L{parse} reports beside them is dropped: for the page's own listing,
    where a longer query showing more is harmless.
    """
    return parse(query).terms


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
