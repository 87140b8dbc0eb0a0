"""Tests for L{smtpproxy.queue}."""
