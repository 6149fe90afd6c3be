"""Apps that tests run in app-node subprocesses (`python -m siocluster.appnode tests.apps:echo`)."""

import gc
import os

from siocluster import App

echo = App()


@echo.on("echo")
def _echo(sid, data):
    return {"echo": data, "pid": os.getpid(), "frozen": gc.get_freeze_count()}
