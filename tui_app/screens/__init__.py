"""The app's dialogs: save, load, prune and help."""
