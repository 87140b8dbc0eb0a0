"""Tests for L{smtpproxy.providers}."""
