"""The durable queue (issue 12): accepted mail kept until the provider took it.

With C{QUEUE_URL} empty the relay delivers directly, as it always did; with a
queue, the front doors (SMTP, HTTP) answer once a message is durable in a
L{smtpproxy.queue.store.QueueStore}, and delivery workers take it from there.

Modules:
  - C{model}: the plain values every store and the worker exchange;
  - C{store}: the L{QueueStore} protocol that each backend implements;
  - C{policy}: retry, expiry and ordering decisions, pure functions;
  - C{sqlite}, C{postgres}: the two backends, chosen by C{QUEUE_URL};
  - C{worker}: the Twisted service that delivers due messages.
"""
