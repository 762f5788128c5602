# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
# ---

# %% [markdown]
# # Instructors: a ten-week course
#
# This page is for a teacher who runs the book as a course. Everything on it is computed when the
# page is built, from the chapters themselves: their objectives and prerequisites (the box at the
# top of each chapter), their prose (for the reading time, at {glue:text}`words_per_minute` words a
# minute) and the wall time of their last execution (`tools/chapter_times.json`). The
# {glue:text}`n_chapters` chapters take about {glue:text}`reading_minutes` minutes to read and
# {glue:text}`run_minutes:.0f` minutes to run, all of them, on {glue:text}`cpus` CPU cores; with
# the exercises, one chapter is a week's work for a student. Each chapter has a deck of slides made
# from its notebook and a short quiz whose answers are checked against `sdlab` in CI.

# %% tags=["hide-input"]
# book-setup: tools/setup_cell.py goes here when the notebook is built

# %% tags=["hide-input"]
import json
import re
import sys
from html import escape
from pathlib import Path

import nbformat
from IPython.display import Markdown

# the repository: this page reads the chapters, their measured times and the quizzes
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "tools" / "chapter_times.json").is_file())
sys.path.insert(0, str(ROOT / "tools"))
from build_notebooks import WORDS_PER_MINUTE, reading_words  # noqa: E402  (each chapter's own time line)
from build_slides import slide_notebook  # noqa: E402

TIMES = json.loads((ROOT / "tools" / "chapter_times.json").read_text())
CHAPTERS = sorted(p.stem for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def exercise_count(nb) -> int:
    """The chapter's exercises: `exercise` directives, or else the numbered items under `## Exercises`."""
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    directives = len(re.findall(r"^(?:`{3,}|:{3,})\{exercise\}", text, re.M))
    section = re.search(r"^## Exercises\n(.*?)(?=^#{1,2} |\Z)", text, re.M | re.S)
    return directives or (len(re.findall(r"^\d+\. ", section[1], re.M)) if section else 0)


def header_field(text: str, label: str) -> str:
    """The paragraph of the chapter's header box that starts with **label**."""
    found = re.search(rf"\*\*{label}\*\* (.+?)(?:\n\s*\n|\n:::|\Z)", text, re.S)
    return " ".join(found[1].split()) if found else ""


def chapter_row(name: str) -> dict:
    nb = nbformat.read(ROOT / "book" / f"{name}.ipynb", as_version=4)
    first = nb.cells[0].source
    deck = slide_notebook(nb)
    return {
        "name": name, "title": re.search(r"^# (.+)$", first, re.M)[1].strip(),
        "learn": header_field(first, "You will learn"), "need": header_field(first, "You need"),
        "words": reading_words(nb), "seconds": TIMES[name]["seconds"], "cpus": TIMES[name]["cpus"],
        "exercises": exercise_count(nb),
        "slides": sum(c.metadata["slideshow"]["slide_type"] in ("slide", "subslide") for c in deck.cells),
        "questions": len(json.loads((ROOT / "book" / "quizzes" / f"{name}.json").read_text())["questions"]),
    }


rows = [chapter_row(name) for name in CHAPTERS]
for week, row in enumerate(rows, start=1):  # one chapter a week in reading order; the last week is the project
    row["week"], row["minutes"] = week, max(1, round(row["words"] / WORDS_PER_MINUTE))
project_week = len(rows) + 1
cpus = {row["cpus"] for row in rows}
assert len(cpus) == 1, f"the chapters were timed on machines of different sizes: {cpus}"

glue("n_chapters", len(rows))
glue("n_weeks", project_week)
glue("words_per_minute", WORDS_PER_MINUTE)
glue("reading_minutes", sum(row["minutes"] for row in rows))
glue("run_minutes", sum(row["seconds"] for row in rows) / 60)
glue("cpus", cpus.pop())
glue("n_slides", sum(row["slides"] for row in rows))
glue("n_questions", sum(row["questions"] for row in rows))
glue("n_exercises", sum(row["exercises"] for row in rows))
longest = max(rows, key=lambda row: row["seconds"])
glue("longest_title", longest["title"])
glue("longest_seconds", longest["seconds"])
print(f"{len(rows)} chapters, {sum(r['minutes'] for r in rows)} min to read, {sum(r['seconds'] for r in rows)} s to run")

# %% [markdown]
# ## The syllabus
#
# One chapter a week, in the book's order, and a project in week {glue:text}`n_weeks`. The times
# are a student's: reading the prose, and running the notebook once from top to bottom (the longest
# run is that of “{glue:text}`longest_title`”, {glue:text}`longest_seconds` s). Exercises are
# counted in each chapter as it is now; slides and quiz questions are linked per week.

# %% tags=["hide-input"] mystnb={"markdown_format": "myst"}
def syllabus_table(rows: list[dict]):
    """The weeks as an HTML table for the book (links to the chapter, its slides and its quiz) and
    as Markdown for the PDF."""
    head = ["week", "chapter", "reading", "running", "exercises", "slides", "quiz"]
    html_rows, md_rows = [], []
    for row in rows:
        label = row["name"].split("_", 1)[1]
        cells = [str(row["week"]), f'<a href="../{row["name"]}.html">{escape(row["title"])}</a>',
                 f'{row["minutes"]} min', f'{row["seconds"]} s', str(row["exercises"]),
                 f'<a href="../../slides/{row["name"]}.slides.html">{row["slides"]} slides</a>',
                 f'<a href="#quiz-{label}">{row["questions"]} questions</a>']
        html_rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        md_rows.append(f'| {row["week"]} | {row["title"]} | {row["minutes"]} min | {row["seconds"]} s | '
                       f'{row["exercises"]} | {row["slides"]} | {row["questions"]} |')
    project = "Project: a tiny model of one's own (chapter 7's training, changed and evaluated)"
    html_rows.append(f'<tr><td>{project_week}</td><td colspan="6">{escape(project)}</td></tr>')
    md_rows.append(f"| {project_week} | {project} | | | | | |")
    html = ('<div class="sdlab-syllabus" style="overflow-x: auto; max-width: 100%;"><table class="table" style="min-width: 40em;">'
            "<thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(html_rows) + "</tbody></table></div>")
    markdown = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" + "\n".join(md_rows)
    return {"text/html": html, "text/markdown": markdown}


display(syllabus_table(rows), raw=True)

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(8, 3.2))
weeks = [row["week"] for row in rows]
ax.bar(weeks, [row["minutes"] for row in rows], color="#1E88E5", label="reading (min)")
ax.bar(weeks, [row["seconds"] / 60 for row in rows], bottom=[row["minutes"] for row in rows], color="#F4511E",
       label="running the notebook (min)")
ax.set_xticks(weeks, [f"wk {row['week']}\n{row['name'][:2]}" for row in rows])
ax.set_ylabel("minutes")
ax.set_title(f"a student's time per chapter (runs measured on {rows[0]['cpus']} CPU cores)")
ax.legend(frameon=False)
plt.show()

# %% [markdown]
# What each week teaches and what it needs, in the chapters' own words:

# %% tags=["hide-input"] mystnb={"markdown_format": "myst"}
Markdown("\n".join(f"- **Week {row['week']}, {row['title']}.** *You will learn* {row['learn']} *You need* {row['need']}"
                   for row in rows))

# %% [markdown]
# ## Prerequisites
#
# The course assumes what the introduction asks of its reader, below; every later chapter names
# the chapters it builds on (the list above). No GPU is needed: every chapter runs on a laptop's
# CPU with the bundled tiny model, and the real SD1.5 checkpoint is optional (the chapters that
# can use it say so, and do when the environment variable `SDLAB_CKPT` names it). A GPU, where
# there is one, is picked up by the setup cell.

# %% tags=["hide-input"] mystnb={"markdown_format": "myst"}
Markdown(f"> *You need* {rows[0]['need']}")

# %% [markdown]
# ## Running it for a class
#
# Students need nothing installed when they use a hosted notebook; every chapter page has a launch
# menu (the rocket button) with these choices:
#
# * **Colab.** The first code cell of each chapter sees Colab and installs `sdlab[book]` from the
#   repository (`pyproject.toml`'s `[project.urls]`). To pin a class to one version, publish a
#   wheel or a tag and set the environment variable `SDLAB_INSTALL_SOURCE` to it (a folder, a wheel
#   or a git URL). A GPU runtime is used when it is chosen.
# * **Binder.** mybinder.org builds the environment of `binder/` with repo2docker: the Python of
#   `binder/runtime.txt` (below), PyTorch's CPU build and `sdlab[book]`. Sessions are free, small
#   and temporary: enough for the tiny model, not for SD1.5.
# * **JupyterHub.** A university hub built from the same `binder/` folder. Set
#   `launch_buttons.jupyterhub_url` in `_config.yml` to the hub's address and rebuild the book: the
#   JupyterHub button appears on every chapter and opens the notebook there through nbgitpuller
#   (which the hub needs installed).
# * **Locally**, in a clone: the install command of the README, then `jupyter lab book/`.
#
# The HTML book (`bash tools/build_book.sh`) works offline, from a folder or a course server, with
# the slides inside it; `bash tools/build_pdf.sh` makes a PDF of the whole book.

# %% tags=["hide-input"]
binder_python = (ROOT / "binder" / "runtime.txt").read_text().strip()
print(f"binder/runtime.txt: {binder_python}")

# %% [markdown]
# ## Grading
#
# The exercises of each chapter come with automatic checks in `sdlab.exercises`: a student calls
# `sdlab.exercises.check_<name>(answer)` on their answer, and the check says what is wrong (a
# shape, a value, a tolerance) or that it is right. The reference solutions are on the {doc}`solutions page <solutions>`,
# hidden in the book until asked for; CI runs every reference solution through its own check, so a
# check cannot reject a right answer without a test failing. A grading scheme that uses this:
#
# * **Weekly exercises**: pass or fail per check, run by the student (or by the teacher over the
#   submitted notebooks: each check is a plain function call);
# * **Quizzes**: for self-testing, below, one per chapter ({glue:text}`n_questions` questions in
#   all); their answers are computed by `sdlab` in the tests, so none is wrong;
# * **Project**: in the last week each student changes one thing in chapter 7's tiny model (the
#   data, a size, the schedule, the training steps), trains it with `python -m sdlab train`, and
#   reports what `python -m sdlab evaluate` measures against the bundled model.
#
# The checks this build of `sdlab` has:

# %% tags=["hide-input"]
try:
    from sdlab import exercises
except ImportError:
    exercises = None
checks = sorted(name for name in dir(exercises) if name.startswith("check_")) if exercises else []
print(f"sdlab.exercises: {len(checks)} checks" + (": " + ", ".join(checks) if checks else " (not in this build)"))

# %% [markdown]
# ## Slides
#
# Each chapter has a deck, {glue:text}`n_slides` slides in all, linked from the syllabus above.
# `python tools/build_slides.py` makes them from the executed notebooks with
# `jupyter nbconvert`'s reveal.js exporter, by one rule, so they follow the chapters without
# any markup in them: a title slide with the chapter's objectives and time, one slide per section
# (its heading, first paragraph and first equation), each figure on a sub-slide of its own, and
# each section's first short code cell with its output. A cell tagged `slide` is shown whole.
# The decks load reveal.js, require.js and MathJax from the book's own copies, so they work offline
# and from a folder. In a deck, the arrow keys move (down: the section's figures), `Esc` shows the
# overview, `S` opens the speaker view, `F` goes full screen; add `?print-pdf` to the address and
# print to get a PDF.
#
# ## Quizzes
#
# A few questions per chapter, answered by clicking; each says at once whether it is right and why.
# The questions are data (`book/quizzes/NN_name.json`); `tests/test_course_kit.py` computes every
# right answer with `sdlab` (a shape, a count, a schedule value, a benchmark figure) and fails if
# the quiz says otherwise.

# %% tags=["hide-input"]
QUIZ_STYLE = """<style>
.sdlab-quiz fieldset { border: 1px solid #ccc; border-radius: .4em; margin: .8em 0; padding: .5em .8em; min-width: 0; }
.sdlab-quiz legend { font-size: 1rem; font-weight: 600; padding: 0 .3em; max-width: 100%; white-space: normal; }
.sdlab-quiz label { display: block; margin: .2em 0; overflow-wrap: anywhere; }
.sdlab-quiz .sdlab-quiz-feedback:empty { display: none; }
.sdlab-quiz .right { color: #1a7f37; } .sdlab-quiz .wrong { color: #b35900; }
</style>"""
QUIZ_SCRIPT = """<script>
(function () {
  var quiz = document.getElementById(QUIZ_ID), answers = ANSWERS, right = {};
  var feedback = quiz.querySelectorAll('.sdlab-quiz-feedback'), score = quiz.querySelector('.sdlab-quiz-score');
  quiz.querySelectorAll('input[type=radio]').forEach(function (input) {
    input.addEventListener('change', function () {
      var q = Number(input.dataset.question), ok = Number(input.value) === answers[q].answer;
      feedback[q].textContent = (ok ? 'Right. ' : 'Not quite. ') + answers[q].explanation;
      feedback[q].className = 'sdlab-quiz-feedback ' + (ok ? 'right' : 'wrong');
      right[q] = ok;
      score.textContent = Object.values(right).filter(Boolean).length + ' of ' + answers.length + ' right';
    });
  });
})();
</script>"""


def inline_code(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def show_quiz(name: str) -> None:
    """The quiz of chapter `name` (`book/quizzes/<name>.json`): radio buttons that answer at once in
    the HTML book, the questions and their choices as Markdown in the PDF."""
    questions = json.loads((ROOT / "book" / "quizzes" / f"{name}.json").read_text())["questions"]
    quiz_id, parts, markdown = f"sdlab-quiz-{name}", [], []
    for i, q in enumerate(questions):
        text = q["question"].format(**q.get("params", {}))
        choices = "".join(f'<label><input type="radio" name="{quiz_id}-{i}" value="{k}" data-question="{i}"> '
                          f"{inline_code(choice)}</label>" for k, choice in enumerate(q["choices"]))
        parts.append(f"<fieldset><legend>{i + 1}. {inline_code(text)}</legend>{choices}"
                     '<p class="sdlab-quiz-feedback" aria-live="polite"></p></fieldset>')
        markdown.append(f"{i + 1}. {text}\n" + "\n".join(f"   - {choice}" for choice in q["choices"]))
    answers = json.dumps([{"answer": q["answer"], "explanation": q["explanation"]} for q in questions]).replace("</", "<\\/")
    script = QUIZ_SCRIPT.replace("QUIZ_ID", json.dumps(quiz_id)).replace("ANSWERS", answers)
    html = (f'{QUIZ_STYLE}<div class="sdlab-quiz" id="{quiz_id}">{"".join(parts)}'
            f'<p class="sdlab-quiz-score" aria-live="polite"></p></div>{script}')
    display({"text/html": html, "text/markdown": "\n\n".join(markdown)}, raw=True)


# %% [markdown]
# (quiz-introduction)=
# ### Quiz: the introduction

# %% tags=["hide-input"]
show_quiz("00_introduction")

# %% [markdown]
# (quiz-attention)=
# ### Quiz: attention

# %% tags=["hide-input"]
show_quiz("01_attention")

# %% [markdown]
# (quiz-clip)=
# ### Quiz: the CLIP text encoder

# %% tags=["hide-input"]
show_quiz("02_clip")

# %% [markdown]
# (quiz-vae)=
# ### Quiz: the VAE

# %% tags=["hide-input"]
show_quiz("03_vae")

# %% [markdown]
# (quiz-unet)=
# ### Quiz: the U-Net

# %% tags=["hide-input"]
show_quiz("04_unet")

# %% [markdown]
# (quiz-samplers)=
# ### Quiz: DDPM and samplers

# %% tags=["hide-input"]
show_quiz("05_samplers")

# %% [markdown]
# (quiz-pipeline)=
# ### Quiz: the pipeline

# %% tags=["hide-input"]
show_quiz("06_pipeline")

# %% [markdown]
# (quiz-train)=
# ### Quiz: training the tiny model

# %% tags=["hide-input"]
show_quiz("07_train")

# %% [markdown]
# (quiz-speed)=
# ### Quiz: speed

# %% tags=["hide-input"]
show_quiz("08_speed")

# %% [markdown]
# (quiz-finetune)=
# ### Quiz: fine-tuning

# %% tags=["hide-input"]
show_quiz("09_finetune")
