"""Code that travels *inside* a factorised export (``trust_remote_code=True``), see :mod:`.writer`."""
