"""The `onnxzip` command line: parses options, calls the Python API, reports.

All the work is done by the library (`onnxzip.merge`, `onnxzip.evaluate`). Errors are turned into messages and
exit codes in one place, `_Group.invoke`: an `OnnxzipError` exits with its class's `exit_code` (see
`onnxzip.errors` and README.md), an interrupt with 130, anything else is an internal error (1).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import traceback

import click

from . import __version__
from .errors import OnnxzipError, UsageError

LOGGER_NAME = "onnxzip"
_VERBOSE_KEY = "onnxzip.verbose"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class _Group(click.Group):
    """The one place where errors become messages and exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own: --help, usage errors (exit 2)
        except OnnxzipError as e:
            _print_traceback_if_verbose(ctx)
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            _print_traceback_if_verbose(ctx)
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug: say so, and how to get the details
            _print_traceback_if_verbose(ctx)
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            verbose = ctx.meta.get(_VERBOSE_KEY)
            hint = " (please report it)" if verbose else " (run with -v for the traceback, please report it)"
            click.echo(f"internal error: {detail}{hint}", err=True)
            ctx.exit(1)


def _print_traceback_if_verbose(ctx: click.Context) -> None:
    if ctx.meta.get(_VERBOSE_KEY):
        traceback.print_exc(file=sys.stderr)


def _setup_logging(ctx: click.Context, verbose: bool, quiet: bool) -> logging.Logger:
    """Log to stderr: INFO by default, DEBUG with -v, WARNING with -q."""
    if verbose and quiet:
        raise click.UsageError("-v and -q contradict each other; give one of them")
    ctx.meta[_VERBOSE_KEY] = verbose
    logger = logging.getLogger(LOGGER_NAME)
    for h in [h for h in logger.handlers if getattr(h, "_onnxzip_cli", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)  # read now: CliRunner swaps sys.stderr
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    handler._onnxzip_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    return logger


def _verbosity_options(f):
    f = click.option("-v", "--verbose", is_flag=True, help="Debug logging; tracebacks on errors.")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only; no progress bars or summary.")(f)
    return f


# ---------------------------------------------------------------------------------------------------------------
# option parsing
# ---------------------------------------------------------------------------------------------------------------


def _parse_names(ctx, param, value):
    """--names: comma-separated names (their count is checked against the models in the command)."""
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(","))
    for n in names:
        if not n or not _NAME_RE.match(n):
            raise click.BadParameter(f"{n!r} is not a valid name: use letters, digits, '_', '.' or '-'")
    if len(set(names)) != len(names):
        raise click.BadParameter(f"the names must differ, got {value!r}")
    return names


def _parse_budget(ctx, param, value):
    if value is None:
        return None
    from .pipeline import parse_budget

    try:
        return parse_budget(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc).replace("--budget must be", "must be"))


def _parse_alpha(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


def parse_stop_at(value: str | None):
    """--stop-at: None/'heads'/'all' -> 'heads' (everything but the task heads), 'input' -> 'input' (nothing
    zipped), an integer K >= 0 -> K (zip the first K weighted layers)."""
    if value is None:
        return "heads"
    v = value.strip().lower()
    if v in ("heads", "all"):
        return "heads"
    if v == "input":
        return "input"
    try:
        k = int(v)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give an integer K (zip the first K weighted layers), "
                                 "'heads' or 'all' (everything but the task heads) or 'input' (nothing zipped)")
    if k < 0:
        raise click.BadParameter(f"{value!r}: the number of layers to zip must be ≥ 0")
    return k


def _stop_at_callback(ctx, param, value):
    return parse_stop_at(value)


# ---------------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="onnxzip", message="%(prog)s %(version)s")
def cli():
    """Merge ONNX models trained on disjoint tasks into one multi-task model, without training (ZipIt!)."""


@cli.command()
@click.argument("models", metavar="A B [C ...]", nargs=-1, required=True)
@click.option("--data", "data", required=True, metavar="PATH",
              help="Unlabeled calibration inputs: .npy (one input) or .npz (arrays named after the inputs).")
@click.option("-o", "--output", required=True, metavar="OUT", help="Where to write the merged .onnx model.")
@click.option("--method", type=click.Choice(["zip", "permute", "average", "ensemble"]), default="zip",
              show_default=True, help="zip: ZipIt!; permute: one-to-one matching; average: identity matching; "
                                      "ensemble: both models side by side, no merging.")
@click.option("--alpha", type=float, default=0.3, show_default=True, callback=_parse_alpha,
              help="ZipIt! alpha: similarity multiplier of a cluster that already merged (≤ 0: merge once).")
@click.option("--beta", type=click.FloatRange(0.0, 1.0), default=0.125, show_default=True,
              help="ZipIt! beta: budget of same-model merges, in [0, 1] (0: only A↔B merges).")
@click.option("--stop-at", "stop_at", default=None, metavar="TEXT", callback=_stop_at_callback,
              help="How far to zip: an integer K (the first K weighted layers), 'heads'/'all' (everything but the "
                   "task heads, the default) or 'input' (nothing zipped).")
@click.option("--num-samples", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Calibration samples to use. A fifth of them (at most 256) is held back to verify the merged "
                   "model (with --verify), the rest calibrates: 1000 calibrate on 800.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Calibration batch size.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where onnxruntime runs the calibration.")
@click.option("--ray", "ray", default=None, metavar="local|auto|ADDRESS",
              help="Shard the calibration pass over a Ray cluster's workers: 'local' starts one on this machine, "
                   "'auto' joins the one Ray finds, or a cluster address (pip install 'onnxzip[distributed]').")
@click.option("--ray-workers", type=click.IntRange(min=1), default=None, metavar="K",
              help="With --ray: the number of shards (and, with --ray local, of CPUs). [default: the cluster's CPUs]")
@click.option("--names", default=None, metavar="A,B,…", callback=_parse_names,
              help="Names of the tasks, one per model: prefixes of the branches and outputs in the merged model. "
                   "[default: a,b,c,…]")
@click.option("--width", type=float, default=None, metavar="W",
              help="With --method zip: each zipped feature space keeps round(W·F) merged features, 1 ≤ W ≤ N (the "
                   "number of models): 1 costs about one model (default), N the ensemble.")
@click.option("--budget", default=None, metavar="params=R|macs=R", callback=_parse_budget,
              help="Fit the merged model in R times the N-model ensemble's parameters or MACs: onnxzip chooses the "
                   "stop point and width that fit and keep the heads closest to the originals on held-back samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (sample selection).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--refit", type=click.Choice(["ls", "none"]), default="ls", show_default=True,
              help="ls: fit every merged layer and head by least squares to what the original models compute "
                   "(closed form, in network order); none: the paper's method (matching, then statistics repair).")
@click.option("--repair/--no-repair", default=True, show_default=True,
              help="With --refit none: correct the merged layers' per-channel statistics (REPAIR). The least-squares "
                   "refit supersedes it.")
@click.option("--repair-targets", type=click.Choice(["measured", "batchnorm"]), default="measured",
              show_default=True,
              help="The repair's per-channel targets: the source channels' measured mean and std, or (the paper's BN "
                   "reset) the merged BatchNorm's beta and |gamma| where the models' BatchNorm parameters are known.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the merged model: finite outputs, close to the originals on held-out samples.")
@click.option("--strict", is_flag=True,
              help="Fail on any operator onnxzip cannot merge instead of leaving it and everything after it unzipped, "
                   "and when nothing at all would be zipped.")
@click.option("--keep-batchnorm", is_flag=True,
              help="Merge BatchNorm parameters per channel instead of first folding each BatchNorm into the "
                   "Conv/Gemm before it (the default, which makes BN-kept and BN-folded exports merge alike).")
@click.option("--fp16", is_flag=True,
              help="Write the merged model in float16 (float32 inputs and outputs), checked against the float32 "
                   "merge on the held-back samples: below 99 % top-1 agreement on a head is an error unless --force.")
@_verbosity_options
@click.pass_context
def merge(ctx, models, data, output, method, alpha, beta, stop_at, num_samples, batch_size, device, ray, ray_workers,
          names, width, budget, seed, force, refit, repair, repair_targets, verify, strict, keep_batchnorm, fp16, quiet,
          verbose):
    """Merge models A, B (, C, …) into one model OUT with one head per task."""
    logger = _setup_logging(ctx, verbose, quiet)
    if len(models) < 2:
        raise click.UsageError(f"give at least two models to merge, got {len(models)}")
    if names is not None and len(names) != len(models):
        raise click.BadParameter(f"{len(names)} name(s) for {len(models)} models: give one name per model",
                                 param_hint="--names")
    if width is not None and not (math.isfinite(width) and 1 <= width <= len(models)):
        raise click.BadParameter(f"must be between 1 and the number of models ({len(models)}), got {width}",
                                 param_hint="--width")
    if budget is not None and (width is not None or ctx.get_parameter_source("stop_at").name != "DEFAULT"):
        raise click.UsageError("--budget chooses the stop point and the width itself; give --budget, or "
                               "--stop-at/--width, not both")
    import onnxzip  # the API; imported here so that `--help` stays fast
    from .pipeline import default_names

    names = names or default_names(len(models))
    result = onnxzip.merge_models(
        list(models), data, output, width=width, budget=budget,
        method=method, alpha=alpha, beta=beta, stop_at=None if budget is not None else stop_at,
        num_samples=num_samples, batch_size=batch_size,
        device=device, names=names, seed=seed, force=force, refit=refit, repair=repair,
        repair_targets=repair_targets, verify=verify, strict=strict, fold_batchnorm=not keep_batchnorm, fp16=fp16,
        progress=not quiet, ray=ray, ray_workers=ray_workers, logger=logger,
    )
    if not quiet:
        for line in result.summary_lines():
            click.echo(line)


def _parse_heads(values) -> dict | None:
    if not values:
        return None
    heads = {}
    for v in values:
        task, sep, output = v.partition("=")
        if not sep or not task or not output:
            raise click.BadParameter(f"{v!r}: write TASK=OUTPUT, e.g. a=a/logits", param_hint="--head")
        if task in heads:
            raise click.BadParameter(f"task {task!r} is given twice", param_hint="--head")
        heads[task] = output
    return heads


def _read_tasks(card_path: str) -> dict:
    from .deploy import read_task_card

    return read_task_card(card_path)[0]


@cli.command("eval")
@click.argument("model_path", metavar="MODEL")
@click.option("--data", "data", required=True, metavar="PATH",
              help="Labeled evaluation data: .npz with 'x' (images) and 'y' (global class ids).")
@click.option("--card", "card", required=True, metavar="PATH",
              help="card.json whose \"tasks\" lists each task's class ids in head order.")
@click.option("--head", "head", multiple=True, metavar="TASK=OUTPUT",
              help="Graph output that is TASK's head (repeatable). Default: the outputs named TASK/...")
@click.option("--task", default=None, metavar="TASK",
              help="Evaluate a single-head model (an original model) as TASK's model.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where onnxruntime runs the model (accuracy and latency).")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Measure the latency (ms per image, batch 1).")
@click.option("--throughput/--no-throughput", default=True, show_default=True,
              help="Measure the throughput (images/s) at batch 1, 8 and 64.")
@click.option("--compare", nargs=2, default=None, metavar="A.onnx B.onnx",
              help="Also time the two original models run one after the other on each batch (throughput at "
                   "batch 1, 8 and 64), for comparison with MODEL.")
@click.option("--runtime", type=click.Choice(["onnxruntime", "openvino"]), default="onnxruntime", show_default=True,
              help="Run the model in onnxruntime or in OpenVINO (CPU plugin, float32 precision).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_verbosity_options
@click.pass_context
def eval_(ctx, model_path, data, card, head, task, batch_size, device, latency, throughput, compare, runtime,
          as_json, quiet, verbose):
    """Per-task and joint accuracy, parameters, MACs, latency and throughput of MODEL."""
    _setup_logging(ctx, verbose, quiet)
    from .evaluate import evaluate, load_eval_data
    from .onnx_io import load_model

    heads = _parse_heads(head)
    if task is not None and heads is not None:
        raise click.UsageError("give either --task or --head, not both")
    tasks = _read_tasks(card)
    if task is not None and task not in tasks:
        raise UsageError(f"--task {task!r} is not a task of {card!r} (tasks: {', '.join(tasks)})")
    model = load_model(model_path)
    x, y = load_eval_data(data)
    if task is not None:
        outputs = [o.name for o in model.graph.output]
        if len(outputs) != 1:
            raise UsageError(f"--task needs a model with one output; {model_path!r} has {len(outputs)} "
                             f"({', '.join(outputs)}); use --head TASK=OUTPUT")
        heads = {task: outputs[0]}
    originals = [load_model(p, f"--compare model {p!r}") for p in compare] if compare else None
    report = evaluate(model, x, y, tasks, heads, batch_size=batch_size, device=device, latency=latency,
                      throughput=throughput, runtime=runtime)
    compared = None
    if originals is not None:
        from .evaluate import measure_throughput

        compared = measure_throughput(originals, device=device, runtime=runtime, input_shape=x.shape[1:])

    if as_json:
        extra = {"compare": {"models": list(compare), "throughput": compared}} if compare else {}
        click.echo(json.dumps({"model": model_path, **report.to_dict(), **extra}, indent=2))
        return
    rows = [("model", model_path)]
    for t in tasks:
        if t in report.per_task_accuracy:
            rows.append((f"task {t}", f"{_pct(report.per_task_accuracy[t])}  ({report.num_images[t]} images, "
                                      f"head {report.heads[t]})"))
        else:
            rows.append((f"task {t}", f"no head  ({report.num_images[t]} images)"))
    rows.append(("joint", f"{_pct(report.joint_accuracy)}  ({report.num_joint_images} images, "
                          f"classes of {', '.join(report.heads)})"))
    if report.task_routing_accuracy is not None:
        rows.append(("task routing", f"{_pct(report.task_routing_accuracy)}  (images whose joint argmax is in "
                                     "their own task's head)"))
    rows.append(("params", f"{report.params:,}"))
    rows.append(("MACs", f"{report.macs:,} per image"))
    where = f"{runtime}, {device}"
    if report.latency_ms is not None:
        rows.append(("latency", f"{report.latency_ms:.3f} ms/image ({where}, batch 1)"))
    if report.throughput:
        rows.append(("throughput", _throughput(report.throughput) + f"  ({where})"))
    if compared:
        rows.append(("A then B", _throughput(compared) + f"  ({', '.join(compare)} one after the other)"))
        rows.append(("speed-up", "  ".join(f"{report.throughput[b] / compared[b]:.2f}x @ {b}" for b in compared)
                     if report.throughput else "n/a (--no-throughput)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@cli.command("deploy")
@click.argument("model_path", metavar="MERGED")
@click.option("--triton", "repository", required=True, metavar="REPO",
              help="Triton model repository to write the model into (created if missing): REPO/NAME/config.pbtxt, "
                   "REPO/NAME/V/model.onnx.")
@click.option("--name", default=None, metavar="NAME",
              help="Model name in the repository. Default: MERGED's file name without .onnx.")
@click.option("--max-batch-size", type=click.IntRange(min=0), default=64, show_default=True,
              help="Triton's max_batch_size; the model's batch axis must be dynamic. 0: no batching, full shapes.")
@click.option("--instances", default="cpu", show_default=True, metavar="cpu|gpu[:K]",
              help="Instance group: K instances (default 1) on CPU or GPU.")
@click.option("--fp16", is_flag=True,
              help="Convert to float16 (float32 inputs and outputs kept) and check it against the float32 model: "
                   "below 99 % top-1 agreement on a head is an error unless --force.")
@click.option("--version", "version", type=click.IntRange(min=1), default=1, show_default=True,
              help="Version folder of the model.")
@click.option("--target-opset", type=click.IntRange(min=7), default=None,
              help="Convert to this ai.onnx opset (onnx.version_converter) and check the outputs did not change.")
@click.option("--ir-version", type=click.IntRange(min=3), default=None,
              help="With --target-opset: the IR version to write (default: that of the ONNX release that "
                   "introduced the opset, never above the model's).")
@click.option("--card", default=None, metavar="PATH",
              help="card.json whose \"tasks\" (and \"class_names\") give each head's classes: one label file per head.")
@click.option("--data", default=None, metavar="PATH",
              help="Samples (.npy/.npz) for the --fp16 / --target-opset checks. Default: the samples the merge held "
                   "back to verify, found through its card.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where onnxruntime runs the checks.")
@click.option("--force", is_flag=True,
              help="Replace an existing model folder; keep an fp16 model below 99 % agreement.")
@_verbosity_options
@click.pass_context
def deploy_(ctx, model_path, repository, name, max_batch_size, instances, fp16, version, target_opset, ir_version,
            card, data, device, force, quiet, verbose):
    """Write MERGED as a Triton Inference Server model (onnxruntime backend) into the model repository REPO."""
    logger = _setup_logging(ctx, verbose, quiet)
    from .deploy import deploy

    result = deploy(model_path, repository, name=name, max_batch_size=max_batch_size, instances=instances, fp16=fp16,
                    version=version, force=force, target_opset=target_opset, ir_version=ir_version, card=card,
                    data=data, device=device, logger=logger)
    if not quiet:
        for line in result.summary_lines():
            click.echo(line)


@cli.command("inspect")
@click.argument("model_a", metavar="A")
@click.argument("others", metavar="[B ...]", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--keep-batchnorm", is_flag=True, help="Analyse with BatchNorm kept, as `merge --keep-batchnorm`.")
@_verbosity_options
@click.pass_context
def inspect_(ctx, model_a, others, as_json, keep_batchnorm, quiet, verbose):
    """Show the feature spaces, task heads, unmerged regions and stop points found in A; with B (C, …), whether each
    matches A and, if not, the first node where they differ. Nothing is run."""
    _setup_logging(ctx, verbose, quiet)
    from .inspect import format_report, inspect_models
    from .onnx_io import load_model

    # weights kept as external data stay in their files (read-only maps): nothing of them is copied
    a = load_model(model_a, "model A", mapped=True)
    loaded = [load_model(p, f"model {chr(ord('B') + k)}" if k < 25 else f"model #{k + 2}", mapped=True)
              for k, p in enumerate(others)]
    report = inspect_models(a, loaded, model_a, list(others), fold_batchnorm=not keep_batchnorm)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if report["match"] is not None and not report["match"]["ok"]:
        ctx.exit(4)  # the MismatchError exit code: scripts can test it


def _throughput(by_batch: dict) -> str:
    return "  ".join(f"{ips:,.0f} img/s @ {b}" for b, ips in by_batch.items())


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.2f} %"


# OpenBLAS's worker threads spin for about 2^28 cycles (~0.1 s) after every BLAS call before they sleep. A merge's
# passes alternate numpy's products with onnxruntime runs, whose threads then wait for cores the spinning ones hold:
# on the bundled ResNet-20 pair at 4000 samples, calibration took 8.7-9.0 s with the spin and 7.4-7.6 s without.
# 2^4 cycles is OpenBLAS's least; it is read once, when numpy or scipy first loads OpenBLAS, so it is set before
# anything imports them. A value the user set is kept.
BLAS_THREAD_TIMEOUT = "4"


def main(argv=None):
    """Console entry point (`onnxzip`, `python -m onnxzip`)."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", BLAS_THREAD_TIMEOUT)
    cli.main(args=argv, prog_name="onnxzip")


if __name__ == "__main__":
    main()
