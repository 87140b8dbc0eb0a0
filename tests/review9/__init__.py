"""Review 9: failing tests for defects found in the durable queue (issue 12)."""
