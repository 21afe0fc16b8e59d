"""Test-suite set-up: ``tests/`` on ``sys.path`` so that every test imports its shared helpers
from the one support package (``from support.dist import run_distributed``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
