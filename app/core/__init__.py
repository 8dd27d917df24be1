"""The pure domain: no I/O, no clocks of its own, no randomness it cannot be handed."""
