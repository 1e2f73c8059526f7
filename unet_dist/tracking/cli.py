"""Tracking tools.

``sync RUN_DIR``: deliver the records a training job left in ``RUN_DIR/tracking_spool`` because
the MLflow server did not answer before the job ended (the next resume of the run delivers them as
well). Sending twice is harmless: metrics the run already holds are skipped.

Example::

    python -m unet_dist.tracking sync runs/checkpoints/demo
    python -m unet_dist.tracking sync s3://bucket/checkpoints/demo --tracking-uri http://mlflow:5000
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from unet_dist import cli


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m unet_dist.tracking", __doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("sync", help="deliver a run's tracking spool", description=cli.plain(__doc__))
    s.add_argument("run_dir", type=cli.location, metavar="RUN_DIR",
                   help="the run's checkpoint folder (train.checkpoint_dir/train.run_name): a path or a store URL")
    s.add_argument("--tracking-uri", type=cli.non_empty, default=None, metavar="URI",
                   help="the MLflow server to send to (default: the one the spool names)")
    s.add_argument("--wait", type=cli.natural, default=60, metavar="S",
                   help="seconds to wait for a server that does not answer, >= 0")
    return p


def run(args: argparse.Namespace) -> None:
    from unet_dist.tracking.sync import sync

    done = sync(args.run_dir, args.tracking_uri, wait_s=args.wait)
    if done is None:
        print(f"sync: nothing spooled in {args.run_dir}")
        return
    print(f"sync: {done.delivered} records delivered to run {done.run_id} at {done.tracking_uri}"
          + (f", {done.dropped} refused (see above)" if done.dropped else "") + "; the spool is empty")


def main(argv: Optional[list[str]] = None) -> None:
    cli.run_main(lambda: run(build_parser().parse_args(sys.argv[1:] if argv is None else argv)))
