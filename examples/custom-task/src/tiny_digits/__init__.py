"""An example jetfed task package (see task.py)."""
