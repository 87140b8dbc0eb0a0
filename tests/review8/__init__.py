"""Review 8: failing tests for defects in the identity backends and SMTP AUTH (issue 15)."""
