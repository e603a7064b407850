"""A coordinator process started early and held: run-local starts it before its own
checks, so its imports (torch, gRPC, the strategies: ~3 CPU-seconds) run on a core that
would sit idle while the launcher imports the same for its checks, and the run no
longer waits for them after the services serve (`make run-local`'s start-up was 3 s
longer).

It prints nothing and writes nothing until told. run-local then sends one JSON line on
its stdin: the coordinator's log file (stderr goes there from then on, after what the
imports wrote) and its arguments; it runs `jetfed coordinator` with them, exactly as
`python -m jetfed.cli coordinator ARGS` would. End of input (a refused run, a service
that failed to start, the launcher gone) ends it quietly: nothing was started."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile


def main() -> int:
    # What the imports write to stderr is kept for the log it will have.
    spool = tempfile.TemporaryFile()
    os.dup2(spool.fileno(), 2)
    from jetfed import cli

    importlib.import_module("coordinator.cli")  # the point: loaded before it is needed

    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0
    order = json.loads(line)
    sys.stderr.flush()
    with open(order["log"], "ab") as log:
        spool.seek(0)
        shutil.copyfileobj(spool, log)
        log.flush()
        os.dup2(log.fileno(), 2)
    spool.close()
    sys.stdin.close()
    sys.stdin = open(os.devnull)
    sys.argv = [cli.__file__, "coordinator", *order["argv"]]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
