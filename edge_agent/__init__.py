"""The device side of edgepack: the agent daemon and the scoring server that runs a module."""

#: the agent reports it to the hub; kept equal to pyproject.toml's version by a test (asking
#: importlib.metadata at run time would cost the daemon about 3 MB of memory)
__version__ = "0.1.0"
