"""Packaged training configs (``gms.py``): ``--config NAME`` resolves to ``gms.py:NAME`` here."""
