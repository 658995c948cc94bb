"""`python -m mipnerf360.photos` stopped by a signal while a step runs: it waits for the step to stop on its own
(train saves a checkpoint on a first Ctrl-C or a SIGTERM), never leaves it running, and exits with one line.

The step is a stand-in for train (a child that, on its first signal, takes a second to "save" and then records
what it got: the signal and how many it received), on a tiny generated scene whose poses photos keeps, so each case runs in a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mipnerf360 import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP = r'''
import os, signal, sys, time
got = []
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(n))
open(sys.argv[1] + '.ready', 'w').write(str(os.getpid()))
while not got:
    time.sleep(0.01)
time.sleep(1.)  # Saving a checkpoint.
open(sys.argv[1], 'w').write(f'{signal.Signals(got[0]).name} {len(got)}')
'''

PHOTOS = r'''
import sys
from mipnerf360 import photos
step, marker, scene, out = sys.argv[1:]
photos._step_command = lambda module, flags: [sys.executable, '-c', step, marker]
sys.exit(photos.main([scene, '--out', out]))
'''


def _wait_until_ready(proc: subprocess.Popen, ready):
    """Until the stand-in step has installed its handlers and written its pid to `ready`."""
    deadline = time.time() + 60
    while not (ready.exists() and ready.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate(timeout=10)


def _kill_what_is_left(proc: subprocess.Popen, ready):
    if proc.poll() is None:
        proc.kill()
    if ready.exists() and ready.read_text():
        try:
            os.kill(int(ready.read_text()), signal.SIGKILL)  # A step left running (the fault under test).
        except ProcessLookupError:
            pass


@pytest.mark.parametrize('sig,to_group', [(signal.SIGINT, True), (signal.SIGINT, False), (signal.SIGTERM, False),
                                        (signal.SIGHUP, False)])
def test_signal_waits_for_the_step_and_exits_with_one_line(tmp_path, sig, to_group):
    """A signal to the whole process group (as a terminal's Ctrl-C) or to photos alone (`kill`)."""
    scene = tmp_path / 'scene'
    synthetic.write_colmap_scene(str(scene), n_views=3, width=32, height=24, factors=(2,), seed=0,
                                 write_points=False)
    marker = tmp_path / 'step_done'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, '-c', PHOTOS, STEP, str(marker), str(scene), str(tmp_path / 'out')],
                            cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    ready = tmp_path / 'step_done.ready'
    try:
        _wait_until_ready(proc, ready)
        time.sleep(0.2)  # The step's handlers are installed before it writes `ready`; photos' before it starts.
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
        step_finished = marker.exists()  # Read when photos has exited: it waited for the step.
    finally:
        _kill_what_is_left(proc, ready)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert proc.returncode == 128 + sig, stderr
    passed_on = signal.SIGTERM if sig == signal.SIGHUP else sig  # The step has no terminal to hang up.
    assert step_finished and marker.read_text() == f'{signal.Signals(passed_on).name} 1'  # Once, not killed.
    assert len(lines) == 1 and lines[0].startswith(f'Stopped ({signal.Signals(sig).name}) during `python -m '
                                                   'train`, which exited with status 0'), stderr


THREADED_STEP = r'''
import sys, threading
from mipnerf360 import photos
step, marker = sys.argv[1:]
photos._step_command = lambda module, flags: [sys.executable, '-c', step, marker]
worker = threading.Thread(target=photos._run_step, args=('Training', 'train', []), daemon=True)
worker.start()
try:
    worker.join()
except KeyboardInterrupt:
    worker.join()
'''


def test_a_step_run_from_another_thread_still_gets_the_terminals_ctrl_c(tmp_path):
    """Off the main thread photos cannot install its handlers, so the step must stay in photos' process group:
    a terminal's Ctrl-C (SIGINT to the group) reaches it, as it did before the steps got their own session."""
    marker = tmp_path / 'step_done'
    ready = tmp_path / 'step_done.ready'
    proc = subprocess.Popen([sys.executable, '-c', THREADED_STEP, STEP, str(marker)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS='1'), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_until_ready(proc, ready)
        os.killpg(proc.pid, signal.SIGINT)
        deadline = time.time() + 20
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists() and marker.read_text() == 'SIGINT 1'
        proc.communicate(timeout=20)
    finally:
        _kill_what_is_left(proc, ready)


SIGNAL_WHILE_STARTING = PHOTOS.replace('sys.exit(', r'''import os, signal, time
start = photos._start_step
def start_then_interrupt(cmd):  # Ctrl-C right after the step started, before photos waits for it.
    proc = start(cmd)
    while not (os.path.exists(marker + '.ready') and open(marker + '.ready').read()):
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)
    return proc
photos._start_step = start_then_interrupt
sys.exit(''')


def test_a_signal_while_the_step_starts_is_passed_on(tmp_path):
    """photos' handlers are in place before the step starts: a Ctrl-C that comes as it starts still reaches it
    (once), instead of stopping photos with a traceback and leaving the step running in its own session."""
    scene = tmp_path / 'scene'
    synthetic.write_colmap_scene(str(scene), n_views=3, width=32, height=24, factors=(2,), seed=0,
                                 write_points=False)
    marker, ready = tmp_path / 'step_done', tmp_path / 'step_done.ready'
    proc = subprocess.Popen([sys.executable, '-c', SIGNAL_WHILE_STARTING, STEP, str(marker), str(scene),
                             str(tmp_path / 'out')], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=30)
        step_finished = marker.exists()
    finally:
        _kill_what_is_left(proc, ready)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert step_finished and marker.read_text() == 'SIGINT 1'
    assert stderr.strip().startswith('Stopped (SIGINT) during `python -m train`'), stderr
