"""The HTTP front door: the health endpoint."""
