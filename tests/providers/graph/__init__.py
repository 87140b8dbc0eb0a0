"""Tests for L{smtpproxy.providers.graph}."""
