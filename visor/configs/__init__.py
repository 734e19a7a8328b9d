"""Shipped configurations: real LLaVA-OV config.json files (written from their published values)."""
