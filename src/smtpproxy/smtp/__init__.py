"""The SMTP front door: the Twisted protocol, its parsers and its listeners."""
