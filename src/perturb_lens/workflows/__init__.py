"""Workflows that compose whole runs from the stages below: one experiment (:mod:`.experiment`),
the handle of a finished run (:mod:`.run_handle`), SAE training, SAE suites and L0 sweeps."""
