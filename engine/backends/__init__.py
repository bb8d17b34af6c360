"""Backend implementations; each module imports its runtime lazily (only when chosen)."""
