"""Volume and file I/O."""
