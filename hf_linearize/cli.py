"""The ``hf-linearize`` command: inspect saved linearized checkpoints; push a finished sweep to the Hub."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

# The commands import the library when they run, so that --help and argument errors return at once.


def _apl(args: argparse.Namespace) -> None:
    from .core_map import path_length_report, plot_core_map
    from .hub import from_pretrained

    report = path_length_report(from_pretrained(args.path, revision=args.revision), ungated_cost=args.ungated_cost)
    if args.plot:
        plot_core_map(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"family: {report['family']}")
    print(f"normalized APL:   {report['normalized_apl']:.4f}  (full depth {report['depth']['normalized']:.4f})")
    print(f"unnormalized APL: {report['unnormalized_apl']:.4f}  (full depth {report['depth']['unnormalized']:.4f})")
    width = max(len(name) for name in report["layers"])
    print(f"\n{'layer':<{width}}  {'units':>6}  {'nonlin':>6}  {'frac':>5}  {'APL(norm)':>9}  {'APL(unnorm)':>11}")
    for name, layer in report["layers"].items():
        print(f"{name:<{width}}  {layer['units']:>6}  {layer['nonlinear']:>6}  {layer['nonlinear_fraction']:>5.2f}  "
              f"{layer['contribution_normalized']:>9.4f}  {layer['contribution_unnormalized']:>11.4f}")


def _summary(args: argparse.Namespace) -> None:
    from .hub import from_pretrained
    from .patching import summary

    print(summary(from_pretrained(args.path, revision=args.revision)))


def _push_results(args: argparse.Namespace) -> None:
    from .hub_results import push_results

    pushed = push_results(args.directory, args.repo_id, push_checkpoints=args.push_checkpoints, private=args.private)
    print(f"pushed {args.directory} to dataset {args.repo_id}: {pushed.dataset_commit_url}")
    for run, repo in pushed.model_repos.items():
        print(f"  {run}: model {repo}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-linearize", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    apl = commands.add_parser("apl", help="average path lengths and the per-layer core-network map")
    apl.add_argument("--json", action="store_true", help="print the full report as JSON")
    apl.add_argument("--plot", metavar="PNG", help="also write the core-network heatmap here")
    apl.add_argument("--ungated-cost", type=float, default=0.0, help="count each softmax/norm node as this")
    apl.set_defaults(run=_apl)
    gates = commands.add_parser("summary", help="per-layer linear/nonlinear unit counts")
    gates.set_defaults(run=_summary)
    for command in (apl, gates):
        command.add_argument("path", help="checkpoint directory or Hub repo id")
        command.add_argument("--revision", default=None, help="Hub branch or commit")
    results = commands.add_parser("push-results", help="push a finished sweep folder (results.json, plots) to a Hub "
                                  "dataset repo")
    results.add_argument("directory", help="the sweep's output_dir, holding results.json")
    results.add_argument("repo_id", help="dataset repo, e.g. me/multi30k-sweep (created when missing)")
    results.add_argument("--push_checkpoints", action="store_true", help="also push each run's final/ to the model "
                         "repo REPO_ID-RUN, linked from the table")
    results.add_argument("--private", action="store_true", default=None, help="create missing repos as private")
    results.set_defaults(run=_push_results)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except Exception as error:
        from .hub import HubPushError  # loaded by any command that can raise it

        if not isinstance(error, (ValueError, NotImplementedError, OSError, HubPushError)):
            raise
        print(f"hf-linearize: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
