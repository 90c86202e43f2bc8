"""One module per command of the ``kvtrace`` command line, imported only when chosen."""
