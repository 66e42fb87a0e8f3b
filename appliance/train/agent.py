"""`python -m appliance.train.agent ARGS`: `accelerate launch ARGS` with the egress guard on.

The launcher (torchrun's agent) of a distributed training runs here, so it is held to the same
rule as every process of the appliance: loopback only, plus the main node's address when the run
spans machines. It dies with the job's worker that started it, and the ranks die with it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from appliance import offline


def main(argv: list[str]) -> int:
    from appliance.train.distributed import PEER_ENV, RANKS_DIR, SPEC_FILE, die_with_parent

    die_with_parent()
    run_dir = Path(argv[-1])  # the ranks' argument: the run, whose spec names the store and its audit log
    store = json.loads((run_dir / RANKS_DIR / SPEC_FILE).read_text(encoding="utf-8"))["store"]
    offline.activate(Path(store) / "audit" / "egress.jsonl")
    if os.environ.get(PEER_ENV):
        offline.allow_peer(os.environ[PEER_ENV])
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    launch_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
