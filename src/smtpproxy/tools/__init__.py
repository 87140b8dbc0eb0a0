"""Operator commands of the C{smtpproxy} console script, one module each.

  - L{smtpproxy.tools.probe}: C{smtpproxy probe HOST[:PORT]}, what a server
    offers (EHLO, TLS, the certificate chain, AUTH) and a verdict;
  - L{smtpproxy.tools.send}: C{smtpproxy send}, one complete test message
    to several recipients, with the server's replies;
  - L{smtpproxy.tools.doctor}: C{smtpproxy doctor}, checks of the relay's own
    settings before mail is lost.

Each module has C{register(subcommands)}, which adds its parser and sets
C{run} to its entry point; L{smtpproxy.cli} only calls them.  The pure
parts (L{smtpproxy.tools.dialogue}, L{smtpproxy.tools.certs}, the verdict
rules, the message builder) are tested without sockets.
"""
