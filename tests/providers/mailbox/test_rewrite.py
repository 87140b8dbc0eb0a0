"""The mailbox's HTML rewrite: resource hints gone, the rest kept, linear on hostile input."""

from __future__ import annotations

import time

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.web.mailbox.rewrite import MAX_REBUILT, without_resource_hints


class ResourceHintTests(SynchronousTestCase):
    def test_every_link_element_is_dropped(self) -> None:
        """C{<link>} goes whatever its rel, spelling or closing; the text around it stays."""
        for rel in ("preconnect", "dns-prefetch", "prefetch", "preload", "prerender", "x"):
            html = (
                f'<p>a<LINK Rel="{rel}" href="http://t.example/">b<link rel={rel} href=//t/ />c</p>'
            )
            self.assertEqual(without_resource_hints(html), "<p>abc</p>", rel)

    def test_meta_http_equiv_scripts_and_comments_are_dropped(self) -> None:
        """Headers set by meta, scripts (speculation rules too) and comments do not reach the
        browser; C{<meta charset>} and the doctype do."""
        html = (
            "<!DOCTYPE html><meta charset=utf-8><meta http-equiv=refresh content=0;url=http://t/>"
            '<script type="speculationrules">{"prefetch":[]}</script>'
            "<!--[if mso]><link rel=preconnect href=http://t/><![endif]--><p>x</p>"
        )
        self.assertEqual(
            without_resource_hints(html), '<!DOCTYPE html><meta charset="utf-8"><p>x</p>'
        )

    def test_the_rest_of_the_document_keeps_its_meaning(self) -> None:
        """Tags, attributes (quoted and escaped), text, entities and style sheets survive."""
        html = (
            '<table width=100%><tr><td class="c" title=\'say "hi"\'>Tom &amp; Jerry &lt;3 '
            '<a href="http://x.example/?a=1&b=2">go</a><img src="cid:logo@x" alt></td></tr>'
            "</table><style>p > a { color: red }</style><br/>"
        )
        self.assertEqual(
            without_resource_hints(html),
            '<table width="100%"><tr><td class="c" title="say &quot;hi&quot;">Tom &amp; Jerry '
            '&lt;3 <a href="http://x.example/?a=1&amp;b=2">go</a><img src="cid:logo@x" alt>'
            "</td></tr></table><style>p > a { color: red }</style><br />",
        )

    def test_what_the_parsers_could_read_differently_is_rebuilt_inert(self) -> None:
        """Where a browser and html.parser may split the original differently (a comment
        closed early, an end tag with attributes, an unclosed quote, a stray C{<}), the
        served document holds no C{<link} the browser could read as an element."""
        for html in (
            "<!--> <link rel=preconnect href=http://t/> -->",
            "<script></script x><link rel=preconnect href=http://t/>",
            "<style></style x><link rel=preconnect href=http://t/>",
            '<a title="<link rel=preconnect href=http://t/>">x</a>',
            "<a b='<link rel=preconnect href=http://t/>",
            "<p <link rel=preconnect href=http://t/>",
            "<![CDATA[<link rel=preconnect href=http://t/>]]>",
            "<title><link rel=preconnect href=http://t/></title>",
            '<iframe srcdoc="<link rel=preconnect href=http://t/>"></iframe>',
            "<svg><style><link rel=preconnect href=http://t/></style></svg>",
            "<svg><![CDATA[<link rel=preconnect href=http://t/>]]></svg>",
        ):
            served = without_resource_hints(html).lower()
            self.assertNotIn("<link", served, html)
            self.assertNotIn("srcdoc", served, html)  # its value would be parsed as a document


class LinearTimeTests(SynchronousTestCase):
    def test_hostile_documents_take_linear_time(self) -> None:
        """Input that makes Python 3.11's html.parser rescan from every C{<} (unclosed tags,
        comments, quotes and declarations) costs about twice as much at twice the size,
        not four times: measured at 60,000 and 120,000 repeats, with room for a busy
        machine (a quadratic parse takes tens of seconds here)."""
        for unit in ("<a ", "<!--", "</", '<a b=">', "<![", "<?", "<a x='\">"):

            def cost(repeats: int, unit: str = unit) -> float:
                html = unit * repeats
                started = time.perf_counter()
                without_resource_hints(html)
                return time.perf_counter() - started

            small, large = cost(60_000), cost(120_000)
            self.assertLess(large, max(small, 0.05) * 6 + 0.5, unit)

    def test_a_body_past_the_limit_is_shown_as_its_source(self) -> None:
        """HTML longer than MAX_REBUILT is served as escaped text: inert, and cheap to make."""
        html = "<link rel=preconnect href=http://t/>" + "x" * MAX_REBUILT
        served = without_resource_hints(html)
        self.assertTrue(served.startswith("<pre>&lt;link rel=preconnect"), served[:40])
        self.assertEqual(served.count("<"), 2)  # <pre> and </pre>
