"""The model: a Llama-style decoder (``llama.py``), its mixture-of-experts layer (``moe.py``) and their
configuration (``config.py``, torch-free)."""
