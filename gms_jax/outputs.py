"""Output folders that a command owns: never delete or overwrite what it did not write.

A folder written by ``gms-jax evaluate`` or ``predict`` holds a manifest (:data:`MANIFEST`) that
lists the command and every file it wrote. Such a folder may be written again by the same
command; any other non-empty folder (or one holding files not in its manifest) is refused with
:class:`gms_jax.errors.OutputError`. Also: input/output overlap checks, and writing files with
the user's umask (``tempfile.mkstemp`` creates them 0600). Plain file I/O; no math.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Iterable

from gms_jax.errors import OutputError

MANIFEST = ".gms-jax-output.json"


def umask_mode(mode: int = 0o666) -> int:
  """``mode`` with the process umask applied (what ``open()`` would have given)."""
  mask = os.umask(0)
  os.umask(mask)
  return mode & ~mask


def apply_umask(path: str, *, directory: bool = False) -> None:
  os.chmod(path, umask_mode(0o777 if directory else 0o666))


def write_atomic(path: str | os.PathLike, write, *, suffix: str = "") -> None:
  """The one atomic file write: ``write(tmp_path)`` fills a temporary file beside ``path``
  (``.tmp-*``, same filesystem), which gets the user's umask (``mkstemp`` makes 0600) and is then
  renamed onto ``path``; on any failure the temporary file is removed and ``path`` is untouched."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=folder)
  os.close(fd)
  try:
    write(tmp)
    apply_umask(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str | os.PathLike, obj, **dump_kw) -> None:
  """:func:`write_atomic` of ``json.dump(obj, **dump_kw)``."""

  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, **dump_kw)

  write_atomic(path, write, suffix=".json")


def _files_under(folder: str) -> set[str]:
  out = set()
  for root, dirs, names in os.walk(folder):
    dirs[:] = sorted(dirs)
    for n in names:
      out.add(os.path.relpath(os.path.join(root, n), folder))
  return out


def read_manifest(folder: str) -> dict | None:
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      m = json.load(f)
    return m if isinstance(m, dict) and isinstance(m.get("files"), list) else None
  except (OSError, ValueError):
    return None


def check_owned(folder: str, command: str, flag: str = "--out") -> str:
  """``"new"`` when ``folder`` is missing or empty, ``"own"`` when it is an earlier output of
  ``command`` holding only files that the manifest lists; raises :class:`OutputError` otherwise."""
  if not os.path.exists(folder):
    return "new"
  if not os.path.isdir(folder):
    raise OutputError(f"{flag} {folder}: exists and is not a folder")
  present = _files_under(folder)
  if not present and not os.listdir(folder):
    return "new"
  manifest = read_manifest(folder)
  if manifest is None or manifest.get("command") != command:
    raise OutputError(
      f"{flag} {folder}: folder is not empty and was not written by gms-jax {command}; "
      "refusing to write into it (choose a new or empty folder)"
    )
  ours = set(manifest["files"]) | set(manifest.get("planned") or [])
  foreign = sorted(n for n in present - ours - {MANIFEST} if not is_own_temporary(n))
  if foreign:
    more = f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
    raise OutputError(
      f"{flag} {folder}: holds files that gms-jax {command} did not write "
      f"({', '.join(foreign[:3])}{more}); refusing to replace it (choose a new folder)"
    )
  return "own"


TMP_PREFIX = ".tmp-"  # write_atomic's temporaries: a killed command's are its own
# The names tempfile.mkstemp gives write_atomic's temporaries: the prefix, 8 characters of
# tempfile's alphabet, the suffix of a file a command writes. A user's ".tmp-notes.txt" is not one.
_OWN_TMP = re.compile(r"^\.tmp-[a-z0-9_]{8}\.(png|json)$")


def is_own_temporary(name: str) -> bool:
  return bool(_OWN_TMP.match(os.path.basename(name)))


def remove_own_temporaries(folder: str) -> int:
  """Removes the temporaries (:func:`is_own_temporary`) a killed run of the command left in its
  own ``folder`` (call after :func:`check_owned` said "own"); returns how many."""
  n = 0
  for name in _files_under(folder):
    if is_own_temporary(name):
      os.remove(os.path.join(folder, name))
      n += 1
  return n


def write_manifest(folder: str, command: str, files: Iterable[str], **extra) -> None:
  """Writes the manifest atomically (temp file + rename), with the user's umask. ``files``: the
  files written and present; ``extra`` may hold ``planned``: files a running command is about to
  write (so that the folder of a killed run is still recognised as the command's own)."""
  files = [f for f in files if os.path.basename(f) != STAGING_MARKER]
  write_json_atomic(
    os.path.join(folder, MANIFEST),
    {"command": command, "files": sorted(set(files)), **extra},
    indent=1,
  )


STAGING_MARKER = ".gms-jax-staging.json"  # inside a staging folder: who made it (host, PID)


def make_staging_dir(out: str) -> str:
  """A fresh, uniquely named folder beside ``out`` (same filesystem, for an atomic rename),
  marked with this host and PID so that a later run can remove it if this one is killed
  (:func:`remove_stale_staging`). Staging folders of killed earlier runs are removed first."""
  import socket

  parent = os.path.dirname(os.path.abspath(out)) or "."
  try:
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    with open(os.path.join(tmp, STAGING_MARKER), "w") as f:
      json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
  except OSError as e:
    raise OutputError(f"--out {out}: cannot write in {parent} ({e.strerror or e})") from None
  apply_umask(tmp, directory=True)
  return tmp


def remove_stale_staging(out: str) -> list[str]:
  """Removes the staging folders (``.<out name>.tmp-*`` beside ``out``) that a killed run left:
  only those holding our marker, written on this host by a process that is gone. Returns them."""
  import socket

  from gms_jax.lock import _alive

  parent = os.path.dirname(os.path.abspath(out)) or "."
  prefix = f".{os.path.basename(out)}.tmp-"
  removed = []
  try:
    entries = [e for e in os.scandir(parent) if e.name.startswith(prefix) and e.is_dir()]
  except OSError:
    return removed
  for e in entries:
    try:
      with open(os.path.join(e.path, STAGING_MARKER)) as f:
        who = json.load(f)
    except (OSError, ValueError):
      continue  # not ours, or not readable: left alone
    if who.get("host") == socket.gethostname() and not _alive(int(who.get("pid", -1))):
      shutil.rmtree(e.path, ignore_errors=True)
      removed.append(e.path)
  return removed


def publish(staging: str, out: str, command: str) -> None:
  """Moves the finished ``staging`` folder to ``out``. An existing ``out`` must still pass
  :func:`check_owned` (an earlier output of ``command``, or empty); it is moved aside and removed
  only after the new folder is in place."""
  marker = os.path.join(staging, STAGING_MARKER)
  if os.path.exists(marker):
    os.remove(marker)
  if check_owned(out, command) == "new" and not os.path.exists(out):
    os.replace(staging, out)
    return
  old = tempfile.mkdtemp(
    prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(os.path.abspath(out))
  )
  os.rmdir(old)  # a unique free name to move the previous output to
  os.replace(out, old)
  try:
    os.replace(staging, out)
  except BaseException:
    os.replace(old, out)
    raise
  shutil.rmtree(old)  # the previous output of this command (checked just above)


def _is_within(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_disjoint(out: str, inputs: Iterable[str], flag: str = "--out") -> None:
  """Refuses an output folder that is, contains, or lies inside one of ``inputs``."""
  for item in inputs:
    if _is_within(out, item) or _is_within(item, out):
      raise OutputError(
        f"{flag} {out}: overlaps the input {item} (an output folder must not be, contain, or "
        "lie inside an input); choose a folder outside the inputs"
      )
