"""Exceptions that end in one clear line for the user, and the documented exit codes."""

from __future__ import annotations

from pathlib import Path

#: Exit codes of the ``arborseg`` command (also documented in the README).
EXIT_OK = 0
EXIT_PARTICIPANT_FAILED = 1  # the run finished, but at least one participant failed
EXIT_USAGE = 2  # command-line usage error (argparse)
EXIT_INPUT = 3  # the input dataset, labels, filters or output location are unusable
EXIT_RESOURCE = 4  # a required resource (template, model) is not available
EXIT_INTERRUPTED = 130  # stopped with Ctrl-C


class ArborSegError(Exception):
    """Base class: the message is shown to the user as a single line, no traceback."""

    exit_code = EXIT_INPUT


class DatasetError(ArborSegError):
    """The BIDS dataset, the selection of participants/sessions or the output location is unusable."""

    exit_code = EXIT_INPUT


class InputFileError(ArborSegError):
    """One input file cannot be used; the message names the file and the problem."""

    exit_code = EXIT_INPUT

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ResourceError(ArborSegError):
    """A resource such as a TemplateFlow template is missing and cannot be fetched."""

    exit_code = EXIT_RESOURCE
