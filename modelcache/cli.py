"""``modelcache`` on the command line. ``modelcache demo`` is the README's main job."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .demo import run_demo


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="modelcache", description="Hold more models than fit on the GPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="register generated models and serve a skewed workload from threads, "
                                       "showing loads, hits and evictions")
    demo.add_argument("--models", type=int, default=12, help="number of generated models (default 12)")
    demo.add_argument("--requests", type=int, default=2000, help="requests in all (default 2000)")
    demo.add_argument("--threads", type=int, default=4, help="client threads (default 4)")
    demo.add_argument("--policy", default="lru", choices=["lru", "lfu", "cost"])
    demo.add_argument("--simulate", action="store_true",
                      help="use a simulated device even where a GPU is present")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(models=args.models, requests=args.requests, threads=args.threads, policy=args.policy,
                        simulate=args.simulate, seed=args.seed)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
