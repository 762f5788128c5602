"""Execute a notebook with nbclient, waiting for the kernel's replies in one-second slices.

One long wait for a reply can miss one that has already arrived (pyzmq's edge-triggered wake-up,
seen under load with widget cells: jupyter/nbclient#312) and then sits out the whole cell timeout,
which looks like a stuck kernel. Each slice ends with a fresh look at the socket, so a reply is
read within a second of its arrival. Used by `tools/build_notebooks.py` and `tests/test_colab.py`.
"""

from __future__ import annotations

import time
from queue import Empty

from nbclient import NotebookClient


def in_slices(get_msg, slice_seconds: float = 1.0):
    """`get_msg(timeout)` of a kernel client's channel, waiting at most `slice_seconds` at a time."""

    async def get_msg_in_slices(timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = slice_seconds if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await get_msg(timeout=min(slice_seconds, left))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    return get_msg_in_slices


class SlicedClient(NotebookClient):
    """A `NotebookClient` whose shell and IOPub channels wait in slices (see the module)."""

    async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
        for channel in (self.kc.shell_channel, self.kc.iopub_channel):
            if not getattr(channel, "sdlab_sliced", False):
                channel.get_msg, channel.sdlab_sliced = in_slices(channel.get_msg), True
        return await super().async_execute_cell(cell, cell_index, execution_count, store_history)
