"""Checkpoints: distributed ones (``dcp.py``; finding and verifying them: ``files.py``, no torch) and Hugging
Face model directories in (``hf_config.py``, no torch; ``hf_load.py``) and out (``hf_export.py``)."""
