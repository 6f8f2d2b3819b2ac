"""Fixed support library for the autoresearch harness: not edited during a research run."""
