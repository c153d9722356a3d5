"""Headless Chromium (Debian's ``chromium``) for the tests of pages people open: its DOM as rendered and its
screenshots. Tests using it carry :data:`needs_chromium`, a skip with the reason when it is absent."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (Debian package "
                                                                           "'chromium'; .ci/run installs it)")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with ``args`` (e.g. ``--dump-dom URL``) in a profile of its own under ``tmp_path``,
    without network side trips; fails the test if it exits non-zero."""
    profile = tmp_path / "chromium-profile"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_screenshot_not_blank(tmp_path: Path, url: str, width: int, height: int) -> None:
    """Chromium's screenshot of ``url`` at ``width`` x ``height`` shows text, tables and plots: enough dark
    pixels, and many grey levels (anti-aliased text, plotted colours), not an empty page or a flat fill."""
    import numpy as np
    from PIL import Image

    shot = tmp_path / "screenshot.png"
    chromium(tmp_path, f"--screenshot={shot}", f"--window-size={width},{height}", "--hide-scrollbars", url)
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (width, height)
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 128).mean() > 0.005
    assert len(np.unique(pixels)) > 50
