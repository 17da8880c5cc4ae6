"""The workdir lock: one ``gms-jax train`` / ``import`` at a time in a workdir.

``WORKDIR/.gms-jax.lock`` (:data:`gms_jax.layout.LOCK_FILE`) is created exclusively
(``O_CREAT | O_EXCL``) by process 0 and holds ``{"host", "pid", "since", "command"}``. A second
run finds it and refuses with one line naming the holder. A lock whose holder is gone (same host,
no such process) is stale: it is taken over with a warning. A lock from another host cannot be
checked and is never taken over. The lock is removed when the run ends, also on an error,
Ctrl-C or SIGTERM (not after SIGKILL: then the next run finds it stale). Plain file I/O.
"""

from __future__ import annotations

import json
import os
import socket
import time

from gms_jax import errors
from gms_jax.layout import LOCK_FILE


class WorkdirBusyError(errors.GmsError):
  """Another run holds the workdir's lock (exit 2)."""

  exit_code = 2


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  return True


class WorkdirLock:
  """``with WorkdirLock(workdir, "train"):`` holds the lock for the block (see module docstring)."""

  def __init__(self, workdir: str, command: str, *, enabled: bool = True, warn=None):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.command = command
    self.enabled = enabled
    self._held = False
    self._warn = warn or (lambda msg: None)

  def _read(self) -> dict:
    try:
      with open(self.path, encoding="utf-8") as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def check(self) -> None:
    """Raises :class:`WorkdirBusyError` when a live run holds the lock (nothing is written):
    the early, quiet refusal a command gives before it sets up logging."""
    if not self.enabled or not os.path.exists(self.path):
      return
    holder = self._read()
    host, pid = holder.get("host"), holder.get("pid")
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
      return  # stale: acquire() takes it over
    raise self._busy(holder)

  def _busy(self, holder: dict) -> WorkdirBusyError:
    return WorkdirBusyError(
      f"{os.path.dirname(self.path)}: in use by gms-jax {holder.get('command', '?')} on host "
      f"{holder.get('host', '?')}, PID {holder.get('pid', '?')}, since "
      f"{holder.get('since', '?')}; wait for it to finish or stop it (a lock whose process "
      f"is gone is taken over; from another host, remove {self.path} by hand)"
    )

  def acquire(self) -> None:
    if not self.enabled:
      return
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": self.command}  # fmt: skip
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
      except FileExistsError:
        holder = self._read()
        host, pid = holder.get("host"), holder.get("pid")
        if host == me["host"] and isinstance(pid, int) and not _alive(pid):
          self._warn(f"{self.path}: stale lock of gms-jax {holder.get('command', '?')} (PID {pid} "
                     f"on {host}, since {holder.get('since', '?')}) is gone; taking it over")  # fmt: skip
          try:
            os.remove(self.path)
          except FileNotFoundError:
            pass
          continue
        if not holder:  # being written right now by its creator
          time.sleep(0.2)
          holder = self._read()
        raise self._busy(holder) from None
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(me, f)
      self._held = True
      return
    raise WorkdirBusyError(f"{self.path}: cannot take the workdir lock")

  def release(self) -> None:
    if not self._held:
      return
    if self._read().get("pid") == os.getpid():
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    self._held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
    return False
