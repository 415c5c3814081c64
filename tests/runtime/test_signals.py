"""GracefulStop: the first signal asks to stop, a second one interrupts as usual."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import scmc_runtime
from scmc_runtime.signals import GracefulStop


def _deliver(signum: int, stop: GracefulStop) -> None:
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5
    while stop.received != signum and time.monotonic() < deadline:
        time.sleep(0.001)  # python runs handlers between bytecodes of the main thread


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_first_signal_only_sets_the_stop_flag(signum):
    with GracefulStop() as stop:
        assert not stop.should_stop() and not stop.requested
        _deliver(signum, stop)
        assert stop.requested and stop.received == signum
        assert stop.should_stop()
        assert stop.should_stop()  # stays stopped


def test_previous_handlers_are_restored_on_exit():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with GracefulStop():
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_a_second_ctrl_c_raises_keyboard_interrupt():
    # What the second signal does is what it did before GracefulStop: make that Python's own
    # Ctrl-C (a test run started in the background of a shell inherits SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with GracefulStop() as stop:
                _deliver(signal.SIGINT, stop)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # interrupted long before this ends
                pytest.fail("second SIGINT did not interrupt")
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_second_sigterm_terminates_the_process():
    script = textwrap.dedent("""
        import os, signal, time
        from scmc_runtime.signals import GracefulStop
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert stop.requested
            print("first signal survived", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        print("not terminated", flush=True)
        """)
    env = dict(os.environ, PYTHONPATH=str(Path(scmc_runtime.__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert done.stdout == "first signal survived\n"


def test_check_every_n_steps_only_reports_on_those_steps():
    with GracefulStop(check_every=3) as stop:
        _deliver(signal.SIGTERM, stop)
        assert [stop.should_stop() for _ in range(4)] == [False, False, True, True]


def test_check_every_must_be_positive():
    with pytest.raises(ValueError):
        GracefulStop(check_every=0)
