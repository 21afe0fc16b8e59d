"""Test-suite set-up: ``tests/`` on ``sys.path`` so that every test imports its shared helpers
from the one support package (``from support.dist import run_distributed``); the selected
subprocess tests start in the background once collection is done (``support/background.py``),
and the shared gloo worlds learn which modules were selected (``support/worlds.py``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import background, worlds  # noqa: E402


def pytest_collection_finish(session):
    worlds.select_modules({item.module.__name__ for item in session.items if getattr(item, "module", None)})
    if not session.config.option.collectonly:
        background.start_selected(item.nodeid for item in session.items)


def pytest_sessionfinish(session, exitstatus):
    background.stop_all()
