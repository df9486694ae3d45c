"""The public functions, one module each: what ``adaptkit.merge(...)`` and ``adaptkit merge`` run."""
