"""Tests for L{smtpproxy.queue}: the store contract every backend keeps, the URL parser,
the retry policy, the worker, the front door, the operator command and the end-to-end runs."""
