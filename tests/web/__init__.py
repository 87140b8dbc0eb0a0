"""Tests for L{smtpproxy.web}."""
