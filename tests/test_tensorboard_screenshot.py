"""scripts/tensorboard_screenshot.sh renders only a TensorBoard it started itself (issue 27)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tensorboard_screenshot.sh"

# Stands in for headless Chromium: records the URL it was asked to render and "screenshots" it.
CHROMIUM = """#!/bin/sh
for a; do last=$a; case $a in --screenshot=*) shot=${a#--screenshot=};; esac; done
echo "$last" > "$(dirname "$shot")/rendered-url"
curl -sf "$last" > "$(dirname "$shot")/rendered-page" && echo png > "$shot"
"""

# A TensorBoard that fails to start while another server answers its port: it leaves an
# impostor (a plain HTTP server) on the port it was given, and exits.
IMPOSTOR = """#!/bin/sh
while [ $# -gt 0 ]; do [ "$1" = --port ] && port=$2; shift; done
setsid {python} -m http.server "$port" --bind 127.0.0.1 --directory "{root}" >/dev/null 2>&1 &
echo $! > "{root}/impostor.pid"
sleep 2
"""


def _tool(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _run(tmp_path: Path, tensorboard: str) -> subprocess.CompletedProcess:
    (tmp_path / "run" / "tensorboard").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir / "chromium", CHROMIUM)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TENSORBOARD=tensorboard)
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "run"), str(tmp_path / "out.png")], env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(shutil.which("curl") is None, reason="the script needs curl")
def test_an_impostor_on_the_port_is_not_rendered(tmp_path):
    _tool(tmp_path / "tensorboard", IMPOSTOR.format(python=sys.executable, root=tmp_path))
    try:
        done = _run(tmp_path, str(tmp_path / "tensorboard"))
    finally:
        pid = tmp_path / "impostor.pid"
        if pid.exists():
            os.kill(int(pid.read_text()), signal.SIGTERM)
    assert done.returncode != 0 and "did not come up" in done.stderr, done.stderr
    assert not (tmp_path / "rendered-url").exists() and not (tmp_path / "out.png").exists()


@pytest.mark.skipif(shutil.which("curl") is None, reason="the script needs curl")
def test_its_own_tensorboard_is_rendered(tmp_path):
    tensorboard = Path(sys.executable).parent / "tensorboard"
    if not tensorboard.exists():
        pytest.skip(f"no {tensorboard}")
    done = _run(tmp_path, str(tensorboard))
    assert done.returncode == 0, done.stderr
    url = (tmp_path / "rendered-url").read_text().strip()
    assert url.startswith("http://127.0.0.1:") and "#scalars" in url
    assert len(url.split("/")[3]) == 32  # under its random path prefix
    assert "tb-relative-root" in (tmp_path / "rendered-page").read_text()
