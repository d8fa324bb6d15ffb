"""
`make run`: the development daemon starts with its PKI and sample image,
and every curl command it prints works when pasted (acceptance of the
foundation issue: tried as a new user would).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from test.support import REPO, Daemon, freePort


def test_devrun_prints_working_commands(tmp_path):
    env = {
        "IMAGEIO_DEV_DIR": str(tmp_path / "dev"),
        "IMAGEIO_PORT": str(freePort()),
        "IMAGEIO_LOCAL_SOCKET": f"/org/tximageio/test-dev/{time.monotonic_ns()}",
    }
    d = Daemon(None, cmd=[sys.executable,
                          os.path.join(REPO, "contrib", "devrun.py")],
               env=env, cwd=REPO)
    try:
        commands = [line.strip() for line in d.lines
                    if line.startswith("  curl ") or "imageioctl -c" in line]
        assert len(commands) >= 14
        for command in commands:
            argv = shlex.split(command)
            if argv[0] == "curl":
                # As pasted, plus: fail on HTTP errors, keep output quiet.
                argv[1:1] = ["--fail-with-body", "-sS", "-o", os.devnull]
            out = subprocess.run(argv, capture_output=True, timeout=60,
                                 cwd=str(tmp_path))
            assert out.returncode == 0, (command, out.stdout, out.stderr)
    finally:
        d.stop()
    assert "Traceback" not in d.output()
