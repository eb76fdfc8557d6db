"""The input stage, on the caller's thread, shared by both backends: media loaded within
their limits (media, documents), pictures resized as the model sees them (geometry), the
picture caches (caches), the sampling checks (validation), the stage itself (stage) and
the local backend's prompt rendering (prompt). Importing the package loads nothing."""
