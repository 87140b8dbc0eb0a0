"""The Email value and the MIME parser that builds it."""
