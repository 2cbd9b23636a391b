"""The one exception type the pipeline raises for bad input; the CLI prints it as a single line."""


class PipelineError(Exception):
    """Bad input to the pipeline (unknown class, unreadable data, unwritable output, ...)."""
