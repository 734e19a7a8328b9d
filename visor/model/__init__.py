"""The VISOR model: layer plan, config, the three layer kinds, cache and generation."""
