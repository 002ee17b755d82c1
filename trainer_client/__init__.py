"""Trainer-side library: the loader client, streaming and decomposed trainers, memory strategies."""
