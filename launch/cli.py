r"""Command line of the launch layer: `python -m launch {run,status,cancel,list,plan} GRID [options]`.

  python -m launch run gin/grids/cpu_mini.gin --gin.EXPERIMENT_ROOT="'/tmp/mini'"        # local, resumable
  python -m launch run gin/grids/paper.gin --backend=tpu_vm --dry-run \
      --gin.EXPERIMENT_ROOT="'gs://my-bucket/paper'" --gin.TFDS_DATA_DIR="'gs://my-bucket/tfds'" \
      --gin.TPU_ZONE="'europe-west4-a'"                                              # print every command
  python -m launch status gin/grids/cpu_mini.gin --gin.EXPERIMENT_ROOT="'/tmp/mini'"
  python -m launch cancel gin/grids/cpu_mini.gin --gin.EXPERIMENT_ROOT="'/tmp/mini'"
  python -m launch plan gin/grids/paper.gin [--topology=v3-32]     # fits the slice? chip-hours? (plan.py)

GRID is a gin grid file (gin/grids/*.gin); `--gin.NAME=VALUE` bindings apply to it (later wins), e.g. its
macros EXPERIMENT_ROOT or launch.Local.concurrency. `--only PATTERN` (repeatable, shell-style, e.g.
'vanilla-*') selects runs. Exit status: 0 done, 1 some stage failed, 2 a usage or configuration error
(one `error:` line), 143 stopped by SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Optional, Sequence

from launch import records, storage
from launch.grid import LaunchError, check_gin_files, load, select
from launch.scheduler import Scheduler

_GIN_FLAG = re.compile(r"^--gin\.([^=]+)=(.*)$", re.S)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m launch", description="Run, watch and cancel a study grid.",
                                   epilog="Bindings: --gin.NAME=VALUE, e.g. --gin.EXPERIMENT_ROOT=\"'/tmp/x'\".")
  commands = parser.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("grid", help="a grid gin file, e.g. gin/grids/cpu_mini.gin")
  common.add_argument("--only", action="append", default=[], metavar="PATTERN",
                      help="only runs whose name matches (shell-style, repeatable), e.g. 'vanilla-*'")
  common.add_argument("--state_dir", help="the launcher's logs and pid files (default: see launch.Grid)")
  common.add_argument("--skip-plan", "--skip_plan", dest="skip_plan", action="store_true",
                      help="run --backend=tpu_vm: create VMs without first planning that every stage fits")
  run = commands.add_parser("run", parents=[common], help="run the grid's unfinished stages")
  run.add_argument("--backend", choices=("local", "tpu_vm"), help="default: the grid's launch.Grid.backend")
  run.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print every command it would run; run nothing")
  run.add_argument("--concurrency", type=int, help="stages at once (local processes or TPU VMs)")
  run.add_argument("--max_retries", type=int, help="further attempts of a failed stage")
  commands.add_parser("status", parents=[common], help="print the progress table")
  cancel = commands.add_parser("cancel", parents=[common], help="stop the grid (SIGTERM: runs checkpoint); "
                               "tpu_vm: delete the VMs")
  cancel.add_argument("--backend", choices=("local", "tpu_vm"), help="default: the grid's launch.Grid.backend")
  commands.add_parser("list", parents=[common], help="print each run's stages, gin files and bindings")
  plan = commands.add_parser("plan", parents=[common], help="compile every stage for the TPU slice: memory, "
                             "fits or not, FLOPs, roofline chip-hours (launch/plan.py); exit 1 if any does "
                             "not fit")
  plan.add_argument("--topology", help="a slice (v3-32, v4-32, v5litepod-16, v5p-32) or a topology name "
                    "(v3:2x2); default: the grid's launch.TpuVm.accelerator_type")
  plan.add_argument("--cache", help="the plan cache, JSON lines (default ~/.cache/scaling_arch/plan/cache.jsonl)")
  plan.add_argument("--out", help="directory for the CSV and JSON (default: beside the cache)")
  plan.add_argument("--no-decode", dest="decode", action="store_false",
                    help="skip the decoding step of fine-tuning stages")
  plan.add_argument("--cached-only", "--cached_only", dest="cached_only", action="store_true",
                    help="compile nothing: the table of what the cache holds, other stages marked not planned")
  return parser


def make_backend(name: str):
  """The backend configured by the grid file's launch.Local / launch.TpuVm bindings."""
  from launch import local, tpu_vm
  return local.Local() if name == "local" else tpu_vm.TpuVm()


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings = [f"{m.group(1)} = {m.group(2)}" for m in map(_GIN_FLAG.match, argv) if m]
  args = _parser().parse_args([a for a in argv if not _GIN_FLAG.match(a)])
  if args.command == "plan":  # plans write nothing under the root and read no data: placeholders
    bindings = ["EXPERIMENT_ROOT = '/tmp/scaling_arch_plan'", "TFDS_DATA_DIR = '/tmp/scaling_arch_plan'"] + bindings
  try:
    grid = load(args.grid, bindings)
    if args.state_dir:
      grid.state_dir_setting = args.state_dir
    runs = select(grid.expand(), args.only)
    if args.command == "plan":
      from launch import plan
      return plan.run_plan(runs, topology=plan.slice_for_grid(args.topology), cache_path=args.cache,
                           out_dir=args.out, name=grid.name, decode=args.decode, cached_only=args.cached_only)
    state = records.StateDir(grid.state_dir)
    if args.command == "list":
      for run in runs:
        for stage in run.stages:
          print(f"{stage.key}  {stage.model_dir}\n  " + " ".join(stage.train_args("<checkpoint>" if stage.previous
                                                                                  else None)))
      return 0
    if args.command == "status":
      stages = [s for r in runs for s in r.stages]
      print(records.table(storage.parallel_map(lambda s: records.stage_status(s, state), stages,
                                               storage.is_remote(grid.root))))
      return 0
    backend = make_backend(args.backend or grid.backend)
    backend.attach(grid, state)
    if args.command == "cancel":
      return backend.cancel(runs, state, print)
    if args.concurrency is not None:
      backend.slots = args.concurrency
    if args.max_retries is not None:
      backend.max_retries = args.max_retries
    backend.skip_plan = bool(getattr(args, "skip_plan", False) or args.dry_run)
    if backend.slots < 1 or backend.max_retries < 0:
      raise LaunchError("--concurrency must be at least 1 and --max_retries at least 0.")
    check_gin_files(runs)
    scheduler = Scheduler(runs, backend, state, grid_path=grid.path)
    return scheduler.dry_run() if args.dry_run else scheduler.run()
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
