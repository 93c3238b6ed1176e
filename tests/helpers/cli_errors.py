"""What every CLI failure must look like: one line `realm-jax <command>: error: ...` on stderr."""


def one_line_error(capsys, command: str = "pretrain") -> str:
  """The error line of a command that just failed (captured by pytest's `capsys`), after checking
  that it is the last stderr line, has the CLI's prefix, and no traceback came before it."""
  err = capsys.readouterr().err.strip().splitlines()
  assert err, "no error printed"
  assert err[-1].startswith(f"realm-jax {command}: error: "), err[-5:]
  assert "Traceback" not in "\n".join(err)
  return err[-1]
