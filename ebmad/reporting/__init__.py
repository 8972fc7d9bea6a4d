"""The sweep report's parts: a sweep's jobs, its tables, the HTML page and the W&B table (entry: ebmad.report)."""
