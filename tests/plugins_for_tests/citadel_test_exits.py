"""A plugin that calls sys.exit() when imported. Only for tests."""

import sys

sys.exit(3)
