"""The run: from the command line to a finished run folder (building, fitting, selection, outputs, job records)."""
