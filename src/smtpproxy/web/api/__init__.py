"""The HTTP submission API (C{/v1}): send mail with a POST, through the SMTP pipeline.

Modules, each with one job:
 - L{keys}: API keys from C{HTTP_API_KEYS} and the keys file; constant-time lookup (pure);
 - L{limits}: the rate-limit tiers (token buckets from L{smtpproxy.policy.ratelimit});
 - L{compose}: strict JSON, field checks, the message built by C{email} (pure);
 - L{problems}: the error type and its JSON shape (pure);
 - L{openapi}: the OpenAPI 3.1 document (data);
 - L{submit}: into the queue or to the provider, and failures as HTTP answers;
 - L{resource}: the C{twisted.web} tree and the order of the checks;
 - L{service}: assembly from the settings, the keys file, SIGHUP.

This file imports nothing, so that L{smtpproxy.config} can read L{keys}
without pulling in Twisted's web and delivery code.
"""
