class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run here (not built, or not for this device)."""
