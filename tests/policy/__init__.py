"""Tests for L{smtpproxy.policy}."""
