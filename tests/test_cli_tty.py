"""The progress bar: drawn on a terminal, never in pipes or with --json."""
import os
import pty
import subprocess
import sys

from conftest import MiB

import blocksnap

PYTHONPATH = os.path.dirname(os.path.dirname(blocksnap.__file__))


def _run_with_tty_stderr(args):
    main, sub = pty.openpty()
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    proc = subprocess.run([sys.executable, "-m", "blocksnap", *args], stdout=subprocess.PIPE, stderr=sub,
                          env=env, timeout=120)
    os.close(sub)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    return proc, b"".join(chunks).decode(errors="replace")


def test_progress_bar_only_on_a_terminal(repo_path, make_image):
    """snapshot create draws a bar on a TTY stderr, and none with --json or when stderr is a pipe."""
    img = make_image("a.raw", 32 * MiB, [(0, os.urandom(16 * MiB))])
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    disk = subprocess.run([sys.executable, "-m", "blocksnap", "--repo", repo_path, "disk", "add", img],
                          capture_output=True, text=True, env=env, check=True).stdout.strip()
    proc, err = _run_with_tty_stderr(["--repo", repo_path, "snapshot", "create", disk])
    assert proc.returncode == 0
    assert "snapshot [" in err and "100.0%" in err
    proc, err = _run_with_tty_stderr(["--repo", repo_path, "snapshot", "create", disk, "--json"])
    assert proc.returncode == 0 and "snapshot [" not in err
    piped = subprocess.run([sys.executable, "-m", "blocksnap", "--repo", repo_path, "snapshot", "create", disk],
                           capture_output=True, text=True, env=env)
    assert piped.returncode == 0 and piped.stderr == ""
