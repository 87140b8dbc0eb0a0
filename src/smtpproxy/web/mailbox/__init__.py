"""The mailbox's web side: its page, Mailpit's JSON API, the sandboxed message view."""
