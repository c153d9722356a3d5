"""The pieces both self-contained pages share (``report.html``, a store's ``_monitor.html``): the base style,
the page's head, and a figure embedded as base64 PNG. Every piece of text passes through :func:`html.escape`."""
from __future__ import annotations

import base64
import html

BASE_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { text-align: left; font-weight: bold; padding: 0.3em 0; }
img { max-width: 100%; }
"""


def page_head(title: str, style: str = "") -> str:
    """From the doctype to the page's ``<h1>``: the title, the base style and ``style`` after it.

    >>> page_head("a < b").endswith("<h1>a &lt; b</h1>")
    True
    """
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{BASE_STYLE}{style}</style></head><body><h1>{html.escape(title)}</h1>")


def figure(key: str, png: bytes, caption: str) -> str:
    """A ``<figure id="figure-KEY">`` holding the PNG inline and its caption.

    >>> figure("roc", b"\\x89PNG", "ROC").startswith('<figure id="figure-roc"><img alt="ROC" src="data:image/png')
    True
    """
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure id=\"figure-{html.escape(key, quote=True)}\"><img alt=\"{html.escape(caption, quote=True)}\" "
            f"src=\"data:image/png;base64,{data}\"><figcaption>{html.escape(caption)}</figcaption></figure>")
