"""Tests for L{smtpproxy.smtp}."""
