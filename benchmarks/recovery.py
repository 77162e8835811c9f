"""How fast the supervisor notices a dead stub and brings the server back (tritonllm/supervisor.py).

Starts tritonserver on a repository under a Supervisor with its serving defaults, waits until ready, then for each
model kills its Python stub with SIGKILL and reports the seconds until the supervisor says not ready and until it
is ready again (after its restart).

  python benchmarks/recovery.py --repository DIR [--models engine,llm]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from tritonllm.server import TritonServer
from tritonllm.supervisor import Supervisor


def wait_until(condition, poll: float = 0.05) -> float:
    while not condition():
        time.sleep(poll)
    return time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--models", default="engine,llm")
    args = parser.parse_args()
    results = []
    with TritonServer(args.repository, log_file=Path("bench-results") / "recovery-tritonserver.log") as server:
        supervisor = Supervisor(server).start()
        try:
            wait_until(lambda: supervisor.health().ready)
            for model in args.models.split(","):
                killed = time.monotonic()
                os.kill(server.stub_pids(model)[0], signal.SIGKILL)
                not_ready = wait_until(lambda: not supervisor.health().ready)
                ready = wait_until(lambda: supervisor.health().ready)
                results.append({"model": model, "not_ready_after_s": round(not_ready - killed, 2),
                                "ready_again_after_s": round(ready - killed, 2),
                                "restarts": supervisor.health().restarts})
        finally:
            supervisor.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
