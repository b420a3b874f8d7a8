"""Method comparisons: ``python -m experiments.results.compare`` writes tables and plots here."""
