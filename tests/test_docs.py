"""The documentation says only what the product does.

* Every ``gms-jax ...`` command line in README.md and docs/ (fenced code and inline code) names a
  real subcommand, real flags and real config names and keys: it is parsed by the command's own
  parser (``gms_jax.cli.<command>.parse``; configs are loaded and validated, nothing is run).
* Every relative link in README.md and docs/ resolves to a file in the repository.
* No document points outside the repository (``../shared``) or cites the reference document.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest

from gms_jax import cli, errors

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
COMMAND = re.compile(r"(?:^|\s|`|&&\s*)(?:\S*/)?gms-jax\s+([a-z][a-z-]*)((?:[^`\n&|#]|&(?!&))*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _command_lines(text: str) -> list[tuple[str, list[str]]]:
  """``(subcommand, args)`` of each gms-jax command in a markdown text (code blocks and inline
  code; a line continued with a trailing backslash is joined)."""
  text = re.sub(r"\\\n\s*", " ", text)
  out = []
  for chunk in re.findall(r"```[^\n]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text):
    for m in COMMAND.finditer(chunk):
      sub, rest = m.group(1), m.group(2).strip()
      if not rest:  # "`gms-jax train`": the command named in prose, not a command line
        continue
      try:
        args = shlex.split(rest)
      except ValueError:
        args = rest.split()
      out.append((sub, args))
  return out


def _all_commands():
  found = []
  for doc in DOCS:
    for sub, args in _command_lines(doc.read_text(encoding="utf-8")):
      found.append(
        pytest.param(sub, args, id=f"{doc.relative_to(REPO)}: {sub} {' '.join(args)}"[:150])
      )
  return found


COMMANDS = _all_commands()


def test_the_docs_hold_commands_of_every_kind():
  subs = {p.values[0] for p in COMMANDS}
  assert {"train", "evaluate", "predict", "compile", "import", "export", "convert"} <= subs, subs


@pytest.mark.parametrize("sub,args", COMMANDS)
def test_every_documented_command_parses(sub, args, monkeypatch):
  monkeypatch.chdir(REPO)  # configs/gms.py:NAME is relative to a checkout
  assert sub in cli.COMMANDS, f"gms-jax {sub}: no such command"
  module = importlib.import_module(cli.COMMANDS[sub][0])
  kw = {"check_paths": False} if "check_paths" in inspect.signature(module.parse).parameters else {}
  try:
    module.parse(list(args), **kw)  # placeholders such as /path/to/busi need not exist
  except SystemExit as e:  # argparse's own parsers (convert, check-data) exit on a bad flag
    assert e.code == 0, f"gms-jax {sub} {' '.join(args)}: rejected by its parser"
  except errors.GmsError as e:
    pytest.fail(f"gms-jax {sub} {' '.join(args)}: {e}")


def test_every_relative_link_resolves():
  broken = []
  for doc in DOCS:
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
      if re.match(r"^[a-z]+:", target) or target.startswith("#"):
        continue
      path = target.split("#", 1)[0]
      if path and not (doc.parent / path).exists():
        broken.append(f"{doc.relative_to(REPO)}: {target}")
  assert not broken, broken


def test_no_document_points_outside_the_repository():
  bad = []
  for doc in DOCS:
    for i, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
      if "../shared" in line or re.search(r"\bSPEC §", line):
        bad.append(f"{doc.relative_to(REPO)}:{i}: {line.strip()[:100]}")
  assert not bad, bad


def test_the_parser_rejects_what_does_not_exist(monkeypatch):
  """The check above can fail: unknown configs, keys, flags and commands are refused."""
  monkeypatch.chdir(REPO)
  from gms_jax.cli import compile as compile_cli
  from gms_jax.cli import evaluate as evaluate_cli
  from gms_jax.cli import train as train_cli

  for bad in (
    ["--config", "nosuch", "--workdir", "w"],
    ["--config", "smoke", "--workdir", "w", "--config.no_such_key=1"],
    ["--config", "smoke", "--workdir", "w", "--bogus"],
  ):
    with pytest.raises(errors.GmsError):
      train_cli.parse(bad)
  with pytest.raises(errors.GmsError):
    compile_cli.parse(["--config", "smoke", "--target", "v99-8"])
  with pytest.raises(errors.GmsError):
    evaluate_cli.parse(["--workdir", "w", "--split", "nosuch"])
  assert "nosuch" not in cli.COMMANDS
