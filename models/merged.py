"""merged: eager page splitting as merged in Linux v6.0 (ada51a9de737, 0378739401cf) and kept since.

The default model; see kvmsplit/split.py for the policy itself.
"""

from kvmsplit.split import MERGED

MODEL = MERGED
