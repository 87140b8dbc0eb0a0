"""smtpproxy: an SMTP relay for software that cannot speak anything newer.

Mail arrives over SMTP and leaves through a provider: stdout by default,
Microsoft Graph when credentials are configured.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
