"""Fetch the JavaScript the built book needs, so that it works with no network.

    python tools/vendor_assets.py          # then: jupyter-book build . -W

MathJax 3 (typesets the math), and require.js and reveal.js (the chapters' slides,
`tools/build_slides.py`) come from the npm registry with `npm install`, pinned below, and are copied
into `book/_static/vendor/` (git-ignored). `_config.yml` points Sphinx's `mathjax_path` at this copy
instead of a CDN. (The book stores no widget state: its explorers carry their own static twins, so
it needs no widget manager.) Runs again only when a version changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = {"mathjax": "3.2.2", "requirejs": "2.3.8", "reveal.js": "4.6.0"}
VENDOR = Path(__file__).resolve().parents[1] / "book" / "_static" / "vendor"
STAMP = VENDOR / "versions.json"


def main() -> int:
    if STAMP.exists() and json.loads(STAMP.read_text()) == PACKAGES and "--force" not in sys.argv:
        print(f"vendored assets up to date in {VENDOR.name}/: {PACKAGES}")
        return 0
    npm = shutil.which("npm")
    if npm is None:
        print("npm not found: install Node.js (apt-get install -y npm)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{name}@{version}" for name, version in PACKAGES.items()]
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--prefix", tmp, *specs],
                       check=True, env={**os.environ, "npm_config_update_notifier": "false"})
        modules = Path(tmp) / "node_modules"
        if VENDOR.exists():
            shutil.rmtree(VENDOR)
        VENDOR.mkdir(parents=True)
        # MathJax: the whole es5 tree (components load their extensions and fonts relative to it)
        shutil.copytree(modules / "mathjax" / "es5", VENDOR / "mathjax", ignore=shutil.ignore_patterns("*.map"))
        shutil.copy(modules / "requirejs" / "require.js", VENDOR / "require.min.js")
        # reveal.js: its built script, styles and themes (with their fonts) and the speaker-notes plugin
        for part in ("dist", "plugin/notes"):
            shutil.copytree(modules / "reveal.js" / part, VENDOR / "reveal.js" / part,
                            ignore=shutil.ignore_patterns("*.map", "*.esm.js"))
        for name in PACKAGES:
            licence = modules / name / "LICENSE"
            if licence.exists():
                shutil.copy(licence, VENDOR / f"LICENSE.{name}")
    (VENDOR / ".gitignore").write_text("*\n")
    STAMP.write_text(json.dumps(PACKAGES, indent=2) + "\n")
    size = sum(f.stat().st_size for f in VENDOR.rglob("*") if f.is_file())
    print(f"vendored {PACKAGES} into book/_static/vendor ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
