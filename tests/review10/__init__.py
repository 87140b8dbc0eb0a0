"""Review 10: failing tests for defects found in the development mailbox (issue 16)."""
