# Setup. In Colab this installs sdlab with the book's libraries (from SDLAB_INSTALL_SOURCE when it
# is set: a folder, a wheel or a git URL); then it picks the device and makes the figures sharp.
import importlib
import os
import subprocess
import sys

SDLAB_SOURCE = "git+https://github.com/sdlab/sdlab"  # the published repository (pyproject.toml [project.urls])
if "google.colab" in sys.modules:
    source = os.environ.get("SDLAB_INSTALL_SOURCE") or SDLAB_SOURCE
    requirement = f"sdlab[book] @ {source}" if "://" in source else f"{source}[book]"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement], check=True)
    importlib.invalidate_caches()
try:
    import sdlab
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f'sdlab is not installed here: pip install "sdlab[book] @ {SDLAB_SOURCE}"') from error

import matplotlib  # noqa: F401  (this and numpy: for the chapter's cells)
from IPython.display import display
import matplotlib.pyplot as plt
import numpy as np  # noqa: F401
import torch
from matplotlib_inline.backend_inline import set_matplotlib_formats

if torch.cuda.is_available():
    DEVICE = "cuda"
elif torch.backends.mps.is_available():
    DEVICE = "mps"
else:
    DEVICE = "cpu"
torch.manual_seed(0)
set_matplotlib_formats("retina")  # PNGs drawn at 2x their display size (160 dpi for 80 dpi on the page)
plt.rcParams.update({"figure.dpi": 80, "savefig.dpi": 160, "figure.figsize": (8, 3.2), "font.size": 10,
                     "image.interpolation": "nearest"})


def glue(name, value):
    """Keep `value` for the prose: the book shows it where the Markdown says {glue:text}`name` (or
    {glue:text}`name:.2f`). The output myst_nb.glue(name, value, display=False) writes, without
    needing myst_nb; nothing shows in Jupyter (the cell prints what it glues)."""
    value = value.item() if hasattr(value, "item") else value  # numpy and torch scalars: plain numbers
    record = "application/papermill.record/"
    display({record + "text/plain": repr(value)}, raw=True, metadata={"scrapbook": {"name": name, "mime_prefix": record}})


print(f"sdlab {sdlab.__version__}, torch {torch.__version__.split('+')[0]}, device {DEVICE}, "
      f"{torch.get_num_threads()} CPU threads")
