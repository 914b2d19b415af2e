"""Model variants of eager page splitting, installed as kvmsplit.models.

Each module defines MODEL; `kvmsplit models` lists them and `--model NAME`
selects one.  mutants/ holds variants with one deliberate bug each.
"""
