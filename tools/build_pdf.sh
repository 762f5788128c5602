#!/usr/bin/env bash
# The book as one PDF, for teachers: book/_build/latex/sdlab.pdf, from the stored notebook outputs
# (no execution), with warnings as errors. Widgets and animations print as static pictures and the
# chapters are numbered by LaTeX (book/_ext/print_book.py); the engine and the file name are set
# in _config.yml (latex:).
#   bash tools/build_pdf.sh            -> book/_build/latex/sdlab.pdf
# Needs XeLaTeX and latexmk; on Debian/Ubuntu (about 400 MB, 1-3 minutes):
#   apt-get install -y --no-install-recommends texlive-latex-recommended texlive-latex-extra \
#       texlive-fonts-recommended texlive-xetex fonts-freefont-otf tex-gyre latexmk
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in xelatex latexmk; do
  command -v "$tool" >/dev/null || { echo "$tool not found: see the apt-get line at the top of $0" >&2; exit 1; }
done
rm -rf book/_build/latex
jupyter-book build . --builder pdflatex -W -n --keep-going --path-output book
test -s book/_build/latex/sdlab.pdf
echo "PDF: book/_build/latex/sdlab.pdf"
