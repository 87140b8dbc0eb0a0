"""Pure tests of API keys (L{smtpproxy.web.api.keys}), the limits, and loading them."""

from __future__ import annotations

import hashlib
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy import config
from smtpproxy.web.api.keys import KeyRing, digest, parse_env_keys, parse_keys_file
from smtpproxy.web.api.limits import Limits
from smtpproxy.web.api.service import load_keys
from tests.web.api.harness import DISABLED_SECRET, OTHER_SECRET, SECRET, key

FILE = """
- id: billing
  secret_sha256: {digest}
  allowed_senders: [billing@example.com]
  allowed_recipients: ["@example.org"]
  allowed_networks: 10.0.0.0/8
  rate_limit_per_min: 5
- id: old
  secret_sha256: {digest2}
  enabled: false
"""


def hexed(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class EnvKeyTests(SynchronousTestCase):
    def test_pairs(self) -> None:
        """id:secret pairs become keys holding only the digest (a secret may hold colons)."""
        keys = parse_env_keys(f" app:{SECRET} , other:{OTHER_SECRET}:x ")
        self.assertEqual([k.id for k in keys], ["app", "other"])
        self.assertEqual(keys[0].secret_digest, digest(SECRET))
        self.assertEqual(keys[1].secret_digest, digest(OTHER_SECRET + ":x"))
        self.assertNotIn(SECRET, repr(keys))

    def test_refusals_never_quote_the_secret(self) -> None:
        """Short secrets, missing colons and repeated or malformed ids are refused; the
        message names the key, never the secret."""
        for text in (
            "app:short-secret",
            "app",
            f"app:{SECRET},app:{OTHER_SECRET}",
            f"bad id:{SECRET}",
        ):
            with self.assertRaises(ValueError) as caught:
                parse_env_keys(text)
            self.assertNotIn("short-secret", str(caught.exception))
            self.assertNotIn(SECRET, str(caught.exception))

    def test_short_secret_refuses_start_up(self) -> None:
        """Through config.load: a 31-character secret is a ConfigError naming HTTP_API_KEYS;
        32 characters are accepted."""
        with self.assertRaises(config.ConfigError) as caught:
            config.load({"HTTP_API_KEYS": "app:" + "x" * 31}, fqdn=lambda: "relay.test")
        self.assertIn("HTTP_API_KEYS", str(caught.exception))
        loaded = config.load({"HTTP_API_KEYS": "app:" + "x" * 32}, fqdn=lambda: "relay.test")
        self.assertEqual(len(loaded.http_api_keys), 1)
        self.assertNotIn("x" * 32, repr(loaded))


class FileTests(SynchronousTestCase):
    def test_file_keys(self) -> None:
        """Every field is read: policy lists, networks, rate, enabled."""
        billing, old = parse_keys_file(
            FILE.format(digest=hexed(SECRET), digest2=hexed(DISABLED_SECRET))
        )
        self.assertEqual(billing.secret_digest, digest(SECRET))
        self.assertTrue(billing.allowed_senders.allows("billing@example.com"))
        self.assertFalse(billing.allowed_senders.allows("ceo@example.com"))
        self.assertTrue(billing.allowed_recipients.allows("x@example.org"))
        self.assertEqual([str(n) for n in billing.allowed_networks], ["10.0.0.0/8"])
        self.assertEqual(billing.rate_limit_per_min, 5)
        self.assertFalse(old.enabled)

    def test_file_refusals(self) -> None:
        """Unknown fields (a typo must not widen a key), bad digests, bad types: errors."""
        good = f"- id: a\n  secret_sha256: {hexed(SECRET)}\n"
        for text in (
            good + "  allowed_recipient: ['@x.example']\n",
            "- id: a\n  secret_sha256: abc\n",
            good + "  enabled: 'no'\n",
            good + "  rate_limit_per_min: -1\n",
            good + "  allowed_networks: [nonsense]\n",
            good + "  mailbox: not-an-address\n",
            good + "  mailbox: [a@x.example]\n",
            "{a: 1}",
            "- [",
        ):
            with self.assertRaises(ValueError, msg=text):
                parse_keys_file(text)

    def test_load_and_reload(self) -> None:
        """load_keys joins the environment's and the file's keys; an id in both is an error."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(FILE.format(digest=hexed(OTHER_SECRET), digest2=hexed(DISABLED_SECRET)))
        settings = config.Config(http_api_keys=(key(),), http_api_keys_file=path)
        ring = load_keys(settings)
        self.assertEqual([k.id for k in ring.keys], ["app", "billing", "old"])
        with open(path, "w") as f:
            f.write(f"- id: app\n  secret_sha256: {hexed(OTHER_SECRET)}\n")
        with self.assertRaises(ValueError):
            load_keys(settings)
        os.remove(path)
        with self.assertRaises(OSError):
            load_keys(settings)

    def test_mailbox(self) -> None:
        """A key's mailbox is read like an identity's; with PROVIDER=graph one outside
        GRAPH_SENDER stops start-up (and a reload) naming the key; other providers ignore it."""
        path = self.mktemp()
        text = f"- id: scan\n  secret_sha256: {hexed(SECRET)}\n  mailbox: Scan@C.example\n"
        with open(path, "w") as f:
            f.write(text)
        (scan,) = parse_keys_file(text)
        self.assertEqual(scan.mailbox, "Scan@C.example")
        graph = config.Config.build(
            provider="graph", http_api_keys_file=path, graph_sender=("scan@c.example",)
        )
        self.assertEqual(load_keys(graph).keys[0].mailbox, "Scan@C.example")
        other = config.Config.build(
            provider="graph", http_api_keys_file=path, graph_sender=("relay@c.example",)
        )
        with self.assertRaisesRegex(ValueError, "key 'scan': mailbox 'Scan@C.example' is not"):
            load_keys(other)
        self.assertEqual(len(load_keys(config.Config(http_api_keys_file=path))), 1)


class LookupTests(SynchronousTestCase):
    def test_lookup(self) -> None:
        """The right secret finds its key; a wrong one, a prefix, or a disabled key's finds none."""
        ring = KeyRing(
            (key(), key("other", OTHER_SECRET), key("old", DISABLED_SECRET, enabled=False))
        )
        found = ring.lookup(OTHER_SECRET.encode())
        self.assertEqual(found.id if found else None, "other")
        for wrong in (SECRET[:-1], SECRET + "x", "", DISABLED_SECRET):
            self.assertIsNone(ring.lookup(wrong.encode()), wrong)


class LimitTests(SynchronousTestCase):
    def test_tiers(self) -> None:
        """Each tier refuses past its rate with the seconds until a token is back, and
        refills with time; a key's own rate overrides the default."""
        clock = Clock()
        limits = Limits(total=4, per_address=3, per_key=2, clock=clock)
        self.assertEqual(
            [limits.address("10.0.0.1") is None for _ in range(4)], [True] * 3 + [False]
        )
        refusal = limits.address("10.0.0.1")
        assert refusal is not None
        self.assertEqual((refusal.tier, refusal.retry_after), ("address", 20))
        self.assertIsNone(limits.address("10.0.0.2"))
        self.assertEqual([limits.key("a", None) is None for _ in range(3)], [True, True, False])
        self.assertIsNone(limits.key("b", 10))
        self.assertIsNone(limits.key("b", 10))
        refusal = limits.key("b", 10)
        assert refusal is not None
        self.assertEqual((refusal.tier, refusal.retry_after), ("global", 15))
        clock.advance(30)
        self.assertIsNone(limits.address("10.0.0.1"))
