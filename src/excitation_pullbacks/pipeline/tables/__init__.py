"""The tasks' tables: rank 0 turns merged predictions into rows (CSV files, W&B tables, summary scalars)."""
