"""Test-suite set-up: ``tests/`` on ``sys.path`` so that every test imports its shared helpers
from the one support package (``from support.dist import run_distributed``); the selected
subprocess tests start in the background once collection is done (``support/background.py``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import background  # noqa: E402


def pytest_collection_finish(session):
    if not session.config.option.collectonly:
        background.start_selected(item.nodeid for item in session.items)


def pytest_sessionfinish(session, exitstatus):
    background.stop_all()
