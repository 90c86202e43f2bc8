"""The kvtrace terminal app and command line. Importing this package does not import textual."""
