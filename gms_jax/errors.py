"""The errors a ``gms-jax`` command reports as one line, and their exit codes.

Every command runs under :func:`gms_jax.cli.main`, which turns an exception into ONE line on
stderr (``gms-jax <cmd>: error: <message>``) and an exit code: 2 for usage/config errors
(:class:`UsageError`, :class:`ConfigError`), 1 for everything else (data errors, unreadable files,
failures). ``--verbose`` (or ``GMS_JAX_VERBOSE=1``) prints the traceback as well.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class GmsError(Exception):
  """Base of the errors raised for the user; ``exit_code`` is the CLI's exit status."""

  exit_code = 1


class UsageError(GmsError, ValueError):
  """Bad command-line arguments (exit 2)."""

  exit_code = 2


class MissingPathError(FileNotFoundError, UsageError):
  """A path named on the command line does not exist (exit 2)."""

  exit_code = 2

  def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror) pairs
    return str(self.args[0]) if self.args else ""


class ConfigError(GmsError, ValueError):
  """A config key with a bad value, an unknown key, or a workdir of another run (exit 2)."""

  exit_code = 2


class OutputError(GmsError):
  """An output path that would destroy files the command did not create (exit 2)."""

  exit_code = 2


class DataError(GmsError, ValueError):
  """A problem with input data; the message names the file and the problem (exit 1)."""


class ConversionError(GmsError, ValueError):
  """Weights that cannot be converted or loaded; the message names the file (exit 1)."""


class NonFiniteLossError(GmsError, FloatingPointError):
  """The training loss became NaN/inf; the workdir keeps the last good checkpoint (exit 1)."""


class Interrupted(GmsError):
  """SIGINT / SIGTERM stopped training at a step boundary after a checkpoint (exit 128 + signal:
  130 for Ctrl-C, 143 for SIGTERM)."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + int(signum)


def one_line(message: object) -> str:
  """``message`` with its lines joined by ``"; "`` (errors are printed on one line)."""
  parts = [p.strip() for p in str(message).splitlines() if p.strip()]
  return "; ".join(parts) if parts else type(message).__name__


def exit_code(exc: BaseException) -> int:
  if isinstance(exc, GmsError):
    return exc.exit_code
  return 1


def describe(exc: BaseException) -> str:
  """The one-line text for ``exc``: its message, prefixed by its type when that is not ours."""
  msg = one_line(exc)
  if isinstance(exc, KeyError) and exc.args:  # str(KeyError('x')) is "'x'": say what it is
    msg = f"missing key {exc.args[0]!r}"
  if isinstance(exc, (GmsError, FileNotFoundError, PermissionError, IsADirectoryError)):
    return msg
  return f"{type(exc).__name__}: {msg}"


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors raise :class:`UsageError` (one line, exit 2) instead of printing the
  usage block and exiting."""

  def error(self, message: str) -> NoReturn:
    raise UsageError(f"{message} (see {self.prog} --help)")
