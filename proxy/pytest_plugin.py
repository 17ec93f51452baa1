"""pytest plugin: per-test cassettes through an in-process replay-proxy."""
