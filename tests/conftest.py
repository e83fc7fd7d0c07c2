"""Fixtures live in one module per area; this file only gathers them."""

import signal

pytest_plugins = ["fixtures_store", "fixtures_mount", "fixtures_s3", "fixtures_http",
                  "fixtures_perms", "fixtures_proxy"]


def pytest_configure() -> None:
    # A suite started in the background of a non-interactive shell (`... &`)
    # inherits SIGINT and SIGQUIT ignored, and so would every tool a test starts:
    # the tests that interrupt a waiting `cat` with SIGINT would then see it
    # ignore the signal. Give this process and its children the usual dispositions.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    # A suite ended by SIGTERM (a timeout, a kill) would die without teardown and
    # leave its FUSE mounts and servers behind: as an interrupt, pytest still runs
    # every fixture's finalizer (unmount, stop the server) on its way out.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
