"""A layout as arithmetic, without torch: its degrees (``dims.py``) and its pipeline's stages
(``pipeline.py``). A run's layout is checked, and planned, before torch is imported."""
