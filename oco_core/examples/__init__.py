"""Example callback programs bundled with oco-core."""
