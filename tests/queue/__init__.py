"""Tests for L{smtpproxy.queue}: the store contract every backend keeps, and the URL parser."""
