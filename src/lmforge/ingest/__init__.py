"""Ingest: raw sources -> cleaned, de-duplicated, split datasets (text, SFT dialogues, preference pairs)."""
