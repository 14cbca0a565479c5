"""Scaling-law fits, tables, plots and the report (reads run.json and metrics.jsonl only)."""
