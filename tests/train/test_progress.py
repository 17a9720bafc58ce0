"""Progress bars on a real pseudo-terminal: the bar is redrawn in place, and files get clean lines.

``attnfast train`` runs in a child process whose stderr is a pseudo-terminal (sized like a window, or 0x0 as
an unsized ``docker run -t`` / ``script`` pty reports). ``TQDM_MININTERVAL=0`` makes tqdm redraw on every
batch, so the number of frames does not depend on how fast this machine is.
"""
import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from attnfast.train.progress import bar

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
TINY = ["train", "--synthetic-n", "20", "--synthetic-size", "32", "--image-size", "32", "--epochs", "1",
        "--batch-size", "2", "--width-mult", "0.125"]
TRAIN_BATCHES = 8  # 16 training images, batch 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("progress_cache"))


def _run_on_pty(argv, env, size, stdout_path=None, timeout=300):
    """Run ``argv`` with stdin/stderr (and stdout unless ``stdout_path``) on a new pty of ``size`` (cols, rows);
    return ``(exit code, every byte the terminal received)``."""
    master, slave = pty.openpty()
    cols, rows = size
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    out = open(stdout_path, "wb") if stdout_path else slave
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=out, stderr=slave, env=env, close_fds=True)
    finally:
        os.close(slave)
        if stdout_path:
            out.close()
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every holder of the slave side is gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail(f"attnfast train did not finish in {timeout} s on the pty")
        return proc.wait(timeout=30), b"".join(chunks)
    finally:
        os.close(master)


def _screen_lines(raw: bytes) -> list:
    """What a terminal shows, line by line: each ``\\r`` returns to column 0 and overwrites from there."""
    lines = []
    for physical in raw.replace(b"\r\n", b"\n").split(b"\n"):
        shown = bytearray()
        for seg in physical.split(b"\r"):
            shown[:len(seg)] = seg
        lines.append(bytes(shown).decode("utf-8", "replace").rstrip())
    return lines


def _frames(raw: bytes, label: str) -> list:
    """The distinct frames of the bar labelled ``label`` (each frame is drawn after a ``\\r``)."""
    text = raw.decode("utf-8", "replace")
    return sorted({m.group(0).strip() for m in re.finditer(re.escape(label) + r"[^\r\n]*", text)})


def _env(cache):
    env = dict(os.environ, ATTNFAST_CACHE=cache, TQDM_MININTERVAL="0", TQDM_MINITERS="1", OMP_NUM_THREADS="1")
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


def _check_bar(raw: bytes):
    frames = _frames(raw, "epoch 1/1 train")
    counts = {int(m.group(1)) for f in frames for m in [re.search(r"(\d+)/%d \[" % TRAIN_BATCHES, f)] if m}
    assert counts >= set(range(TRAIN_BATCHES)), frames  # redrawn for every batch (0/8 .. 7/8 at least)
    assert any("loss=" in f for f in frames), frames  # the running loss is shown
    assert _frames(raw, "validate"), "no validation bar"
    assert raw.count(b"\r") > TRAIN_BATCHES  # redrawn in place, not one line per update


def _assert_clean(path):
    data = open(path, "rb").read()
    assert data and b"\r" not in data and not ANSI.search(data) and b"\x1b" not in data, (path, data[:300])
    return data.decode()


def test_bar_on_a_terminal_and_clean_log_file(cache, tmp_path):
    """A 100x30 terminal on stderr, stdout redirected to a log file (``attnfast train > run.log``)."""
    out, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    code, raw = _run_on_pty([sys.executable, "-m", "attnfast.cli", *TINY, "--out", out], _env(cache),
                            (100, 30), stdout_path=log)
    assert code == 0, raw[-3000:]
    _check_bar(raw)
    widest = max(len(line) for line in raw.decode("utf-8", "replace").replace("\n", "\r").split("\r"))
    assert widest <= 100, widest  # the bar fits the window
    text = _assert_clean(log)
    assert "attnfast train:" in text and "epoch 1 |" in text and "done in" in text
    metrics = _assert_clean(os.path.join(out, "metrics.csv"))
    assert metrics.startswith("epoch,train_loss")


def test_bar_on_an_unsized_terminal_leaves_log_lines_whole(cache, tmp_path):
    """A 0x0 pty (nobody set its size) holding stdout and stderr: tqdm alone would draw no bar there."""
    out = str(tmp_path / "run")
    code, raw = _run_on_pty([sys.executable, "-m", "attnfast.cli", *TINY, "--out", out], _env(cache), (0, 0))
    assert code == 0, raw[-3000:]
    _check_bar(raw)
    screen = _screen_lines(raw)
    epoch_lines = [line for line in screen if "epoch 1 |" in line]
    # the bar was cleared before the epoch line was printed: the line on screen is the log line alone
    assert len(epoch_lines) == 1 and epoch_lines[0].startswith("epoch 1 | train loss"), screen
    assert not [line for line in screen if "train:" in line and "%" in line], screen  # no bar left behind
    _assert_clean(os.path.join(out, "metrics.csv"))


def test_no_bar_into_files_pipes_or_when_disabled(tmp_path):
    log = tmp_path / "stderr.log"
    with open(log, "w") as f:
        for _ in bar(range(5), "x", stream=f):  # stderr redirected to a file: no frames written
            pass
    assert log.read_text() == ""
    buf = io.StringIO()
    b = bar(range(3), "x", stream=buf)
    assert list(b) == [0, 1, 2] and b.disable and buf.getvalue() == ""
    b.set_postfix(loss="1.0")  # the trainer calls this on a disabled bar too
    master, slave = pty.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as tty:
            off, on = bar(range(3), "x", enabled=False, stream=tty), bar(range(3), "x", stream=tty)
            assert off.disable and not on.disable  # --no-progress wins; a terminal gets a bar
            on.close()
    finally:
        os.close(master)
        os.close(slave)
