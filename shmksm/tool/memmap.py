"""A picture of physical memory: the frame pool as an image, one pixel a frame.

Free frames are dark, frames waiting for reclamation grey, private frames
(mapped by one PTE) blue, KSM pages coloured by how many PTEs map them (from
2 to max_page_sharing, on a logarithmic scale), and the zero page (frame 0)
cyan, circled in red.  :class:`MapRecorder` draws the map at the end of a run, and
with ``every`` seconds also as numbered frames of an animation
(``FILE-0001.png``, ...) put together as ``FILE.gif``.  Needs matplotlib.
"""

from __future__ import annotations

import math
import os
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .._mm.frames import INUSE, KSM, WAITING, ZERO_PFN
from .._mm.system import System
from .plots import require_matplotlib

FREE, WAITING_FRAME, PRIVATE, KSM_PAGE, ZERO_PAGE = range(5)
_COLOURS: Final = {FREE: (0.12, 0.12, 0.14), WAITING_FRAME: (0.5, 0.5, 0.5), PRIVATE: (0.27, 0.51, 0.71),
                   ZERO_PAGE: (0.0, 0.85, 0.85)}
_NAMES: Final = {FREE: "free", WAITING_FRAME: "waiting for reclamation", PRIVATE: "private (one mapping)",
                 KSM_PAGE: "KSM page", ZERO_PAGE: "zero page"}


def frame_kinds(system: System) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int32]]:
    """Each frame's kind (FREE ... ZERO_PAGE) and mapcount, read without locks (a picture, not a check)."""
    flags = system.frames.flags.copy()
    mapcount = system.frames.mapcount.copy()
    kinds = np.full(len(flags), FREE, np.uint8)
    kinds[(flags & INUSE) != 0] = PRIVATE
    kinds[(flags & WAITING) != 0] = WAITING_FRAME
    kinds[((flags & KSM) != 0) & ((flags & INUSE) != 0)] = KSM_PAGE
    kinds[ZERO_PFN] = ZERO_PAGE
    return kinds, mapcount


def draw_map(system: System, path: str, title: str = "") -> dict[str, int]:
    """Draw the frame pool of ``system`` into the PNG ``path``; return the frames of each kind."""
    plt = require_matplotlib()
    from matplotlib import colors
    from matplotlib.patches import Circle, Patch

    kinds, mapcount = frame_kinds(system)
    n = len(kinds)
    width = max(1, math.ceil(math.sqrt(n)))
    height = -(-n // width)
    top = max(2, int(system.get("max_page_sharing")))
    ksm_colours = plt.get_cmap("autumn_r")
    norm = colors.LogNorm(vmin=2, vmax=top)
    rgb = np.ones((height * width, 3))  # the cells after the last frame stay white
    for kind, colour in _COLOURS.items():
        rgb[:n][kinds == kind] = colour
    ksm = np.flatnonzero(kinds == KSM_PAGE)
    if len(ksm):
        rgb[ksm] = ksm_colours(norm(np.clip(mapcount[ksm], 2, top)))[:, :3]
    fig, ax = plt.subplots(figsize=(7.5, 6.2))
    ax.imshow(rgb.reshape(height, width, 3), interpolation="nearest")
    ax.add_patch(Circle((0, 0), radius=max(1.5, width / 60), fill=False, edgecolor="red", lw=1.2))
    ax.set_xticks([])
    ax.set_yticks([])
    counts = {_NAMES[k]: int(np.count_nonzero(kinds == k)) for k in _NAMES}
    mappings = int(mapcount[ksm].sum()) if len(ksm) else 0
    ax.set_title(f"{title}\n{n} frames, one pixel each: {counts['free']} free, {counts['private (one mapping)']} "
                 f"private, {len(ksm)} KSM pages for {mappings} mappings", fontsize=8)
    handles = [Patch(facecolor=_COLOURS[k], edgecolor="black", lw=0.3, label=_NAMES[k])
               for k in (FREE, WAITING_FRAME, PRIVATE, ZERO_PAGE)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=ksm_colours), ax=ax, shrink=0.5, anchor=(0.0, 0.0))
    bar.set_label("KSM page: mappings (mapcount)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return counts


class MapRecorder:
    """Draws the frame pool at the end of a run (``finish``) and, with ``every`` seconds, on the way (``tick``)."""

    def __init__(self, path: str, every: float | None = None, title: str = "") -> None:
        self.path = path
        self.every = every
        self.title = title
        self.frames: list[str] = []
        self._next = 0.0

    def _frame_path(self, number: int) -> str:
        stem, ext = os.path.splitext(self.path)
        return f"{stem}-{number:04d}{ext or '.png'}"

    def tick(self, system: System, elapsed: float) -> None:
        """Draw a frame of the animation if ``every`` seconds passed since the last one."""
        if self.every is None or elapsed < self._next:
            return
        self._next = elapsed + self.every
        path = self._frame_path(len(self.frames) + 1)
        draw_map(system, path, f"{self.title} at {elapsed:.1f} s")
        self.frames.append(path)

    def finish(self, system: System, elapsed: float) -> dict[str, Any]:
        """Draw the final map (and the animation of the frames, if any); what was written."""
        counts = draw_map(system, self.path, f"{self.title} at the end, {elapsed:.1f} s")
        out: dict[str, Any] = {"map": self.path, "frames": counts}
        if self.frames:
            from PIL import Image

            stem, _ = os.path.splitext(self.path)
            images = [Image.open(p) for p in [*self.frames, self.path]]
            images[0].save(f"{stem}.gif", save_all=True, append_images=images[1:], duration=700, loop=0)
            for image in images:
                image.close()
            out["animation"] = f"{stem}.gif"
            out["animation_frames"] = list(self.frames)
        return out
