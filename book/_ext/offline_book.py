"""A small Sphinx extension for the book: no page declares the same inline script twice.

sphinx-thebe and sphinx-togglebutton (pulled in by Jupyter Book 1.x) add their inline
configuration scripts from events that a build can fire more than once, which leaves e.g.
`const THEBE_JS_URL` declared twice on a page: a JavaScript error in every browser. After the
build, the second copy of any identical inline `<script>` line of a page's head is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

INLINE_SCRIPT = re.compile(r"^\s*<script>[^<]*</script>\s*$")


def _dedupe_inline_scripts(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    for page in Path(app.outdir).rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        head, sep, body = text.partition("</head>")
        seen, lines = set(), []
        for line in head.splitlines(keepends=True):
            if INLINE_SCRIPT.match(line):
                if line.strip() in seen:
                    continue
                seen.add(line.strip())
            lines.append(line)
        new = "".join(lines) + sep + body
        if new != text:
            page.write_text(new, encoding="utf-8")


def setup(app):
    app.connect("build-finished", _dedupe_inline_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
