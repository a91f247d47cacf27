"""The data: its configuration (``config.py``), the sources it reads and their tokens (``sources.py``, no
torch) and the loader's windows and batch order (``loader.py``)."""
