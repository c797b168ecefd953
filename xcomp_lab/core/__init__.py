"""Foundations every other folder uses: units (GiB), dtypes, argument checks, JSON-lines files, resources, the machine."""
