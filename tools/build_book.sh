#!/usr/bin/env bash
# Build the book as CI does: vendor the JavaScript (npm), then render the stored notebook outputs
# (no execution: _config.yml has execute_notebooks: off) with warnings as errors, then the
# chapters' slides (reveal.js, offline: tools/build_slides.py).
#   bash tools/build_book.sh            -> book/_build/html, book/_build/html/slides
# The notebooks themselves are (re)written and executed by tools/build_notebooks.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python tools/vendor_assets.py
# Sphinx does not always re-copy changed static files on incremental builds (the PDF, in
# book/_build/latex, stays)
rm -rf book/_build/html book/_build/.doctrees
jupyter-book build . -W -n --keep-going --path-output book
python tools/build_slides.py book/_build/html/slides
