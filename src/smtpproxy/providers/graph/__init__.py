"""The Microsoft Graph provider: payloads, retries, tokens and its settings."""
