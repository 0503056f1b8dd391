"""The ``homodistil`` command line: distill, demo, report, export, evaluate, compare, plan."""
from __future__ import annotations

import argparse
import logging
import os
import sys

EPILOG = """examples:
  homodistil demo                                           # the embedded demo, end to end
  homodistil distill configs/demo.yaml                      # only the distillation
  homodistil distill configs/demo.yaml trainer.max_steps=20 deepspeed.zero_optimization.stage=2
  torchrun --nproc_per_node 2 -m homodistil.cli distill configs/demo.yaml   # 2 processes
  homodistil export runs/demo runs/demo/exported            # dense HF model from a checkpoint
  homodistil evaluate runs/demo/export --quick              # fine-tune + linear probe on offline tasks
  homodistil plan configs/homobert_base.yaml --gpu a100-80gb --nodes 1
  homodistil compare configs/compare.yaml --sizes 0.29,0.5 --seeds 0,1,2 --jobs 2   # vs the alternatives
"""



def _user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can cause (config, data, paths, models): one line on stderr, exit code 2."""
    from homodistil.apps.report import ReportError
    from homodistil.config import ConfigError
    from homodistil.data.corpora import DataError
    from homodistil.engine.checkpoint import CheckpointError
    from homodistil.engine.export import ExportError
    from homodistil.engine.losses import LossError
    from homodistil.engine.models import ModelError
    from homodistil.engine.numerics import TrainingStopped
    from homodistil.pruning.adapters import AdapterError

    return (ConfigError, DataError, AdapterError, ExportError, LossError, ModelError, CheckpointError, TrainingStopped,
            ReportError)


def _distill(args) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    from homodistil.config import load_config
    from homodistil.engine.recipe import distill

    distill(load_config(args.config, args.overrides))
    return 0


def _demo(args) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    from homodistil.apps.demo import demo_main

    return demo_main(args.config, args.overrides)


def _report(args) -> int:
    from homodistil.apps.report import write_report

    eval_dir = args.eval or (os.path.join(args.run_dir, "eval") if any(os.path.exists(
        os.path.join(args.run_dir, "eval", f)) for f in ("eval_results.json", "decoder_results.json")) else None)
    print(f"report: {write_report(args.run_dir, eval_dir)}")
    return 0


def _export(args) -> int:
    from homodistil.apps.export import export_main

    return export_main(args.checkpoint, args.out_dir)


def _evaluate(args) -> int:
    from homodistil.apps.decoder_eval import decoder_evaluate_main, is_causal_export
    from homodistil.eval.report import evaluate_main

    if is_causal_export(args.model_dirs[0]) and args.tasks is None:  # held-out text and continuations; --tasks: downstream
        path = decoder_evaluate_main(args.model_dirs, args.teacher, args.out)
        print(path.read_text())
        print(f"written: {path}")
        return 0

    evaluate_main(args.model_dirs, args.tasks, args.out or "runs/eval", args.quick, teacher=args.teacher)
    return 0


def _compare(args) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    from homodistil.apps.compare import compare_main

    return compare_main(args.rest[1:] if args.rest[:1] == ["--"] else args.rest)


def _plan(args) -> int:
    from homodistil.apps.plan import plan_main

    return plan_main(args.rest[1:] if args.rest[:1] == ["--"] else args.rest)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="homodistil", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compress a pre-trained transformer by homotopic distillation: the student starts as "
                    "the teacher and is pruned step by step while it is distilled.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("distill", help="distill while pruning (resumes from the output dir's last checkpoint)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("config", help="YAML config (see configs/); 'defaults' for the built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override any config key, e.g. trainer.max_steps=100 pruning.metric=sensitivity")
    p.set_defaults(func=_distill)
    p = sub.add_parser("demo", help="distill, export, evaluate teacher vs student and write a report with plots",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("config", nargs="?", default="configs/demo.yaml", help="YAML config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for distill")
    p.set_defaults(func=_demo)
    p = sub.add_parser("report", help="(re)write RUN_DIR/report.md and its plots from a run's files")
    p.add_argument("run_dir")
    p.add_argument("--eval", help="evaluation directory (default: RUN_DIR/eval if present)")
    p.set_defaults(func=_report)
    p = sub.add_parser("export", help="write a dense Hugging Face model from a checkpoint")
    p.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or one checkpoint directory")
    p.add_argument("out_dir", help="where to write config.json, model.safetensors and the tokenizer")
    p.set_defaults(func=_export)
    p = sub.add_parser("evaluate", help="fine-tune and probe exported models on downstream tasks")
    p.add_argument("model_dirs", nargs="+", help="exported model directories (e.g. runs/demo/export)")
    p.add_argument("--teacher", help="the teacher's model directory, listed first for comparison")
    p.add_argument("--tasks", default=None,
                   help="comma-separated: rt-polarity, rt-score, tweets-3class, the GLUE tasks (cola ... rte), "
                        "squad, squad_v2, NAME=DIR for local files, or the groups offline/glue "
                        "(default: the offline tasks whose data is installed; for a causal-LM export, no tasks "
                        "but held-out perplexity, KL, latency and greedy continuations on its run's text)")
    p.add_argument("--out", default=None, help="where eval_results.json / .md go (default: runs/eval; for "
                                                "causal-LM exports RUN/eval, with decoder_results.json / .md)")
    p.add_argument("--quick", action="store_true", help="capped data and one epoch: minutes on a CPU")
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("compare", add_help=False,
                       help="HomoDistil vs one-shot, from-scratch, magnitude and no-KL at several sizes and seeds")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_compare)
    p = sub.add_parser("plan", help="memory per GPU and run time for a config on a cluster", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["plan"], ["compare"]):  # these have their own parsers, --help included
        argv = [argv[0], "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    if args.command == "demo" and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], "configs/demo.yaml"
    if getattr(args, "config", None) == "defaults":
        args.config = None
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("homodistil").setLevel(logging.INFO)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"homodistil: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("homodistil: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The console script and ``python -m homodistil.cli``: :func:`main`, then the process group
    torn down before the interpreter exits (``main`` itself leaves it: callers in one process,
    as the tests, run it many times over one group)."""
    try:
        code = main()
    finally:
        if "torch" in sys.modules:  # `homodistil --help` and the config checks never import it
            from homodistil.engine.dist import shutdown_distributed  # noqa: PLC0415

            shutdown_distributed()
    sys.exit(code)


if __name__ == "__main__":
    run()
