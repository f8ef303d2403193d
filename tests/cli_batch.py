"""Run several command lines of one real CLI in one process: the cases of a table share
the interpreter start and the torch import, each gets its own argv, stdout and stderr.

    python tests/cli_batch.py training.train:main '[["--lr", "inf"], ...]'

prints one JSON list of {"code", "out", "err"}. The command runs through click's
standalone mode exactly as ``python training/train.py ...`` runs it; an exception that
escapes the command is printed with its traceback, as the interpreter would.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    module, attr = sys.argv[1].split(":")
    command = getattr(importlib.import_module(module), attr)
    results = []
    for argv in json.loads(sys.argv[2]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                command.main(args=argv, prog_name=module, standalone_mode=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:  # what the interpreter would print for an escaped error
                traceback.print_exc()
                code = 1
        results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
