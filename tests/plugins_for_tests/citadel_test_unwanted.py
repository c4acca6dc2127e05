"""A plugin that tests disable: importing it is a failure. Only for tests."""

raise RuntimeError("the disabled plugin 'unwanted' was imported")
