"""Tests for L{smtpproxy.mime}."""
