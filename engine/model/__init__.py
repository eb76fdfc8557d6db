"""The model and where it runs: device selection (device), loading (loader) and the
process's heap setting (memory). Importing the package loads nothing."""
