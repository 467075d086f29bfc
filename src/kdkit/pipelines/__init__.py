"""Recipes: whole workflows built from the loop (experiments, chains, stages)."""
