"""The `segpipe` command line.

The options of `segment`, `evaluate` and `train` are generated from the fields of their
config (`pipeline.config`): name, type, default and help come from one place, so the command
line, the flows and `infra/prefect.yaml` cannot drift apart. A config is validated once, here,
and checked against what it names (`pipeline.preflight`: weights, inputs, OUTPUT, credentials)
before Prefect, Ray or torch are imported, then handed to its flow whole. Each mistake is one
line naming the option as typed, and exit code 2.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import difflib
import json
import logging
import os
import re
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from flows._prefect_server import TemporaryServer, temporary_server
from pipeline.config import (
    MODEL_NAMES,
    EvaluateConfig,
    JobConfig,
    RunError,
    SegmentConfig,
    StorageOptions,
    TrainConfig,
    TrainingError,
    option_name,
    parse_json_object,
)
from pipeline.errors import StorageUnavailableError, error_chain

# options a command takes besides its config's fields
_SECRET_HELP = ("name of a Prefect Secret block holding storage options (credentials) as a JSON object "
                "(default: none)")


# what a JSON object option's error shows it as, quoted for the shell
_JSON_EXAMPLES = {"label_map": """'{"255": 1}'""", "storage_options": """'{"endpoint_url": "http://localhost:9000"}'"""}


def _json_object(example: str | None) -> Callable[[str], dict[str, Any]]:
    def parse(text: str) -> dict[str, Any]:
        try:
            return parse_json_object(text, "the value")
        except ValueError as err:  # `255:1` for a label map, or the shell's quotes lost
            shown = f": give a JSON object, quoted for the shell, e.g. {example}" if example else ""
            raise argparse.ArgumentTypeError(str(err).replace("the value ", "") + shown) from None

    return parse


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not valid JSON") from None


def _cron(text: str) -> str:
    """A cron schedule of five fields. Prefect's takes a sixth, as seconds, so a
    '0 2 * * * *' would run every second of 02:00 instead of once a night."""
    fields = text.split()
    if len(fields) != 5:
        raise argparse.ArgumentTypeError(f"{text!r} has {len(fields)} fields; a cron schedule has 5: minute hour "
                                         "day-of-month month day-of-week, e.g. '0 2 * * *' for 02:00 UTC")
    return text


def _argument(name: str, field: Any, positional: bool) -> tuple[list[str], dict[str, Any]]:
    """argparse's name and keywords for one config field, from its type and description."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    keywords: dict[str, Any] = {"help": _help(field) if not positional else field.description or ""}
    if annotation is bool:
        keywords["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        keywords |= {"choices": list(args), "type": type(args[0])}
    elif origin is tuple and args and args[-1] is not Ellipsis:  # (H, W), (LOW, HIGH)
        keywords |= {"nargs": len(args), "type": args[0]}
    elif origin is tuple and args[0] in (str, int, float):  # names, one per class; band numbers
        keywords |= {"nargs": "+", "type": args[0]}
    elif annotation is StorageOptions or origin is dict:
        keywords["type"] = _json_object(_JSON_EXAMPLES.get(name))
    elif origin is tuple:  # nested, e.g. a palette: JSON
        keywords["type"] = _json_value
    else:
        keywords["type"] = annotation
    if positional:
        return [name], keywords | {"metavar": name.upper()}
    # None: not given, so the config's own default applies (and is validated the same way)
    keywords |= {"dest": name, "default": None, "required": field.is_required()}
    return [option_name(name)], keywords


def _help(field: Any) -> str:
    """The field's description with its default, unless the description says it ("default:
    ...", a default that depends on other settings) or the option is required."""
    text = field.description or ""
    if field.is_required() or "default:" in text:
        return text
    default = field.get_default(call_default_factory=True)
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, tuple):
        shown = " ".join(map(str, default))
    else:
        shown = "none" if default in (None, {}, "") else default
    return f"{text} (default: {shown})"


def add_config_arguments(parser: argparse.ArgumentParser, config: type[JobConfig]) -> None:
    for name in config.positional:
        flags, keywords = _argument(name, config.model_fields[name], positional=True)
        parser.add_argument(*flags, **keywords)
    for name, field in config.model_fields.items():
        if name not in config.positional:
            flags, keywords = _argument(name, field, positional=False)
            parser.add_argument(*flags, **keywords)


def config_from_arguments(config: type[BaseModel], args: argparse.Namespace) -> Any:
    given = {name: getattr(args, name) for name in config.model_fields if getattr(args, name, None) is not None}
    return config(**given)


class UsageError(ValueError):
    """A setting the user gave is wrong: one line, exit 2."""


# pydantic's wording of a value out of bounds ("Input should be greater than or equal to 1"),
# as an option's own help puts it
_BOUNDS = {"greater_than_equal": "must be {ge} or more", "greater_than": "must be more than {gt}",
           "less_than_equal": "must be {le} or less", "less_than": "must be less than {lt}",
           "string_too_short": "must not be empty"}


def _validation_lines(err: ValidationError, config: type[JobConfig]) -> list[str]:
    # pydantic's own text echoes input values, which may be credentials: name the option only
    lines = []
    for problem in err.errors():
        where = [str(part) for part in problem["loc"] if not isinstance(part, int)]
        bound = _BOUNDS.get(problem["type"])
        if problem["type"] == "string_too_short" and problem["ctx"]["min_length"] != 1:
            bound = None
        message = bound.format(**problem["ctx"]) if bound else problem["msg"].removeprefix("Value error, ")
        lines.append(f"{config.argument_name(where[0])}: {message}" if where else message)
    return lines


def _prefect_logging(default_level: str) -> None:
    """Prefect's log level, unless PREFECT_LOGGING_LEVEL sets it. The one-shot commands print
    their own progress, summary and one-line errors, which Prefect's log lines (and its
    tracebacks of the same errors) would tear through: CRITICAL. `segpipe serve` is a service
    whose log is Prefect's, each flow run's start, progress, summary and end state: INFO.
    The temporary server a command may start has no one to report usage to (offline, it logs
    an error for each attempt). Set before Prefect is imported, which reads its settings once."""
    given = os.environ.setdefault("PREFECT_LOGGING_LEVEL", default_level)
    level = given.strip().upper()
    if level not in _PREFECT_LEVELS:  # Prefect's settings would fail on it, with a traceback, at its import
        raise UsageError(f"PREFECT_LOGGING_LEVEL={given}: Prefect takes {', '.join(_PREFECT_LEVELS[:-1])} "
                         f"or {_PREFECT_LEVELS[-1]}")
    os.environ["PREFECT_LOGGING_LEVEL"] = level  # as Prefect takes it: " info" too failed its settings
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's background services log under their class names, outside the `prefect`
    # loggers that setting governs: "EventsWorker - Still processing items" after a flow
    # that failed at once, under the command's one-line error. Never below WARNING.
    for service in ("EventsWorker", "APILogWorker"):
        logging.getLogger(service).setLevel(max(logging.getLevelName(level), logging.WARNING))


_PREFECT_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _start_prefect() -> TemporaryServer:
    """Prefect's temporary server, when the command needs one (flows/_prefect_server.py): it
    comes up while the command starts Ray and imports its flow."""
    _prefect_logging("CRITICAL")
    return temporary_server()


def _preflight(check: Callable[..., None], config: JobConfig, storage_secret: str | None) -> None:
    """The job's checks (`pipeline.preflight`), before Prefect or Ray are imported and before
    anything is written: with the storage options the flow will merge, except those of a
    Secret block, which only Prefect can load (the flow checks remote URLs with them)."""
    from flows._storage import resolve_storage_options
    from pipeline.storage import unreachable_fails_fast

    # a store refusing the connection at the command line is far likelier a mistyped endpoint
    # than an outage: said at once. A scheduled flow's own checks keep the retries, since an
    # endpoint that served last night and blips now is the likelier there.
    with unreachable_fails_fast():
        if storage_secret:
            check(config, remote=False)
        else:
            check(config.with_storage_options(resolve_storage_options(config.storage_options, None)))


class _Uncoloured:
    """A text stream that drops ANSI colour codes from what is written to it: Ray colours the
    "[repeated 2x across cluster]" of the lines it forwards whatever it writes to, with no
    setting to turn that off."""

    _CODE = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, stream: typing.TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(self._CODE.sub("", text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _plain_output_when_piped() -> None:
    """No colour codes in output that goes to a file or a pipe. Ray colours the prefix of the
    log lines it forwards from its workers whether or not it writes to a terminal; Prefect's
    console log lines (PREFECT_LOGGING_LEVEL=INFO) are coloured by rich, which asks the
    stream, unless told otherwise (FORCE_COLOR). Set before either is imported; what is
    coloured regardless is dropped by the streams themselves (`_Uncoloured`)."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("PREFECT_LOGGING_COLORS", "false")
        sys.stdout, sys.stderr = (stream if isinstance(stream, _Uncoloured) else _Uncoloured(stream)
                                  for stream in (sys.stdout, sys.stderr))


def _segment(args: argparse.Namespace) -> int:
    """Run the segmentation flow with a progress bar and print a summary; errors of single
    images do not change the exit code, only a run that could not happen does.

    A night with nothing new ends before Prefect, Ray or a model start: the commit markers are
    read against the listing first (`pipeline.run.up_to_date`). Otherwise Prefect's temporary
    server is launched, then Ray starts here, and the model replicas load in the background
    while the server comes up and the flow is imported; the flow's run takes them over.
    Both need the storage options here, so not with --storage-secret (a Prefect block): the
    flow's run then reads the markers itself before it starts Ray."""
    from pipeline.preflight import check_segment
    from pipeline.run import summary_lines

    config = _dated(config_from_arguments(SegmentConfig, args))
    _preflight(check_segment, config, args.storage_secret)
    replicas = listing = None
    if not args.storage_secret:
        from flows._storage import resolve_storage_options
        from pipeline.run import up_to_date

        resolved = config.with_storage_options(resolve_storage_options(config.storage_options, None))
        # the run goes on with this listing: the archive is listed once, not again from its start
        listing = up_to_date(resolved)
        if isinstance(listing, dict):
            print("\n".join(summary_lines(listing)))
            return 0
    try:
        prefect_server = _start_prefect()
        if not args.storage_secret:
            from pipeline.runtime.replicas import Replicas

            replicas = Replicas(resolved)
            replicas.start()
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from flows.segment import segment_archive
        from pipeline.outputs import LayoutMismatchError

        # the spinner only where it spins: to a file or a pipe, the bar is printed once, at the end
        spinner = (SpinnerColumn(),) if sys.stderr.isatty() else ()
        columns = (*spinner, TextColumn("{task.description}"), TimeElapsedColumn())
        # to a file or a pipe, the line whole: rich cuts it at the 80 columns it assumes there
        console = Console(stderr=True, width=None if sys.stderr.isatty() else 1000)
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("starting Prefect, Ray and the model")
            try:
                with prefect_server.api():
                    summary = segment_archive(config, storage_secret=args.storage_secret, replicas=replicas,
                                              listing=listing,
                                              on_progress=lambda p: bar.update(task, description=p.describe()))
            except LayoutMismatchError as err:
                raise UsageError(str(err)) from err
        print("\n".join(summary_lines(summary)))
    finally:
        if listing is not None:
            listing.close()  # the run closes it; unless it never started (its checks refused the config)
        if replicas is not None:
            replicas.close()  # removes the replicas, and shuts down the Ray it started
    return 0


def _dated(config: SegmentConfig | EvaluateConfig) -> SegmentConfig | EvaluateConfig:
    """The config with its night's date in its URLs (`JobConfig.dated`). A --date given where
    no URL holds {date} would do nothing: refused, as the night meant would not be the one run.
    Here rather than in the config's validation: a flow's run validates its config again once
    the URLs are filled, when none holds {date} any more."""
    if config.date is not None and not any("{date}" in getattr(config, name) for name in config.dated_urls):
        *others, last = (config.argument_name(name) for name in config.dated_urls)
        urls = f"{', '.join(others)} and {last}"
        raise UsageError(f"--date {config.date} fills {{date}} in {urls}, and none of them holds it; put {{date}} "
                         "where the night's folder is named (e.g. s3://cams/{date}/), or leave --date out")
    return config.dated()


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.preflight import check_evaluate

    config = _dated(config_from_arguments(EvaluateConfig, args))
    _preflight(check_evaluate, config, args.storage_secret)
    prefect_server = _start_prefect()
    from flows.evaluate import evaluate_predictions
    from pipeline.evaluation import class_table

    with prefect_server.api():
        report = evaluate_predictions(config, storage_secret=args.storage_secret)
    print(class_table(report, markdown=False))
    print(f"report: {config.output.rstrip('/')}/metrics.json, per_image.parquet, confusion_matrix.png, per_class_iou.png")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pipeline.preflight import check_serve

    # a deployment's parameters are read by whichever process runs it, in whatever folder
    config = config_from_arguments(SegmentConfig, args).with_absolute_paths("source", "output", "weights")
    _preflight(check_serve, config, args.storage_secret)
    _prefect_logging("INFO")
    from flows.deployments import serve_deployments

    serve_deployments(config, storage_secret=args.storage_secret, cron=args.cron)
    return 0


_SCORE_NAMES = {"val_miou": "val mIoU", "train_miou": "train mIoU"}  # as the epochs' lines say them


def _train(args: argparse.Namespace) -> int:
    """Run the training flow and print its epochs and where the checkpoint is."""
    from pipeline.preflight import check_train
    from pipeline.text import counted, score_text

    config = config_from_arguments(TrainConfig, args)
    _preflight(check_train, config, args.storage_secret)
    prefect_server = _start_prefect()
    from flows.train import train_model

    with prefect_server.api():
        summary = train_model(config, storage_secret=args.storage_secret)
    if summary["resumed"]:  # what was taken from the checkpoint, and what differs from it
        print(summary["resumed"])
    print(f"{'epoch':>5} {'loss':>8} {'train mIoU':>10} {'val mIoU':>8} {'images/s':>8}")
    for e in summary["epochs"]:
        print(f"{e['epoch']:>5} {e['loss']:>8.4f} {score_text(e['train_miou'], 10)} {score_text(e['val_miou'], 8)} "
              f"{e['images_per_second']:>8.1f}")
    print(f"{counted(summary['train_images'], 'training image')} and {counted(summary['val_images'], 'validation image')}, "
          f"{counted(summary['workers'], summary['device'] + ' worker')}, {summary['seconds']:.0f} s; best "
          f"{_SCORE_NAMES[summary['score']]} {score_text(summary['best_score'])} at epoch {summary['best_epoch']}")
    for line in summary["left_out"] + summary["absent_classes"]:
        print(line)
    print(f"checkpoint: {summary['output']} (the best epoch; run it with: segpipe segment SOURCE OUTPUT --weights "
          f"{summary['output']})")
    print(f"last epoch: {summary['last_checkpoint']} (--resume {summary['last_checkpoint']} with more --epochs goes on "
          "after it)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The whole product on this machine: local S3 endpoint, both flows, a DuckDB query."""
    prefect_server = _start_prefect()
    from flows.demo import run_demo

    with prefect_server.api():
        run_demo(args.output, model=args.model, images=args.images)
    return 0


def _models(_: argparse.Namespace) -> int:
    print("\n".join(MODEL_NAMES))  # the registry's names, without importing torch
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("segpipe")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line (the usage itself is one `--help` away), with the prefix of
    every other refusal (`main`), whichever subcommand's parser found it."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"segpipe: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segpipe", description="Batch semantic segmentation of image archives.")
    parser.add_argument("--version", action="version", version=f"segpipe {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    jobs = [
        ("segment", SegmentConfig, _segment,
         "segment every image under SOURCE on Ray; write masks and Parquet tables to OUTPUT",
         "Segment every image under SOURCE (any fsspec URL) into OUTPUT. Re-running skips shards already "
         "committed with the same inputs and settings."),
        ("evaluate", EvaluateConfig, _evaluate, "dataset-wide IoU of predicted masks against ground truth",
         "Pair masks by key relative to each root (extension and suffixes removed), score them on Ray, and "
         "write metrics.json, per_image.parquet and plots to OUTPUT."),
        ("train", TrainConfig, _train,
         "fine-tune a model on labelled images (Ray Train); write a checkpoint segment can run",
         "Train MODEL on the images under IMAGES and the label masks under LABELS (PNG of class ids, paired by "
         "key as in evaluate) and write the best checkpoint, with its classes and palette, to OUTPUT. "
         "`segpipe segment --weights OUTPUT` runs it with no other flag."),
    ]
    for name, config, run, summary, description in jobs:
        job = commands.add_parser(name, help=summary, description=description)
        add_config_arguments(job, config)
        job.add_argument("--storage-secret", help=_SECRET_HELP)
        job.set_defaults(run=run, job_config=config, after_stop=_AFTER_STOP[name])

    serve = commands.add_parser(
        "serve", help="serve the nightly segmentation and the evaluation deployments from this process",
        description="One process, no work pool: Prefect's serve() runs both flows, the segmentation on its "
        "nightly schedule with the options given here (those of `segment`; SOURCE may contain {date}). "
        "Credentials go in --storage-secret: Prefect stores a deployment's parameters.",
    )
    # serve takes segment's fields, with SOURCE and OUTPUT as required options
    for name, field in SegmentConfig.model_fields.items():
        if name != "date":  # each nightly run fills {date} with its own night
            flags, keywords = _argument(name, field, positional=False)
            serve.add_argument(*flags, **keywords | {"required": name in SegmentConfig.positional})
    serve.add_argument("--storage-secret", help=_SECRET_HELP)
    serve.add_argument("--cron", type=_cron, default="0 2 * * *", help="schedule, UTC (default: %(default)s)")
    serve.set_defaults(run=_serve, job_config=JobConfig)  # every field an --option here, SOURCE too

    demo = commands.add_parser(
        "demo", help="run both flows on generated images through a local S3 endpoint, no cluster or cloud needed",
    )
    demo.add_argument("--output", default="segpipe-demo", help="folder for the outputs (default: %(default)s)")
    demo.add_argument("--model", default="deeplabv3_mobilenet_v3_large", help="model name (default: %(default)s)")
    demo.add_argument("--images", type=int, default=6, help="generated scenes (default: %(default)s)")
    demo.set_defaults(run=_demo)

    models = commands.add_parser("models", help="list the model names")
    models.set_defaults(run=_models)
    return parser


# what a switch given a value is most likely given: `--crf no` for `--no-crf`
_SWITCH_VALUES = frozenset({"yes", "no", "true", "false", "on", "off", "0", "1"})


def _misspelled_option(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """A command not known, when one is close; or the first --option its subcommand does not
    take, when one it takes is close: argparse would report a required option as missing first
    (`--num-clases 11`: "the following arguments are required: --num-classes"), or the unknown
    one without the likely one. Or a switch given a value (`--crf no`), which argparse reports
    as an unrecognized argument "no" without the switch's other form."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)  # the command: options come after
    if at is None:
        return None
    if argv[at] not in commands.choices:  # misspelled: argparse names every command but not the one meant
        close = difflib.get_close_matches(argv[at], list(commands.choices), n=1, cutoff=0.75)
        return f"unknown command {argv[at]} (did you mean {close[0]}?)" if close else None
    actions = commands.choices[argv[at]]._actions
    known = [flag for action in actions for flag in action.option_strings]
    switches = {flag: action for action in actions if isinstance(action, argparse.BooleanOptionalAction)
                for flag in action.option_strings}
    rest = argv[at + 1 :]
    for arg, following in zip(rest, [*rest[1:], None], strict=False):  # the last one is followed by nothing
        if arg == "--":
            break
        if arg in switches and following is not None and following.lower() in _SWITCH_VALUES:
            on, off = switches[arg].option_strings
            return f"{arg} takes no value ({arg} {following}): {on} turns it on, {off} turns it off"
        name = arg.split("=", 1)[0]
        # a prefix of a known option is argparse's to take (or to call ambiguous)
        if name.startswith("--") and not any(flag.startswith(name) for flag in known):
            # compared without the dashes every long option shares, which would make any two look alike
            close = difflib.get_close_matches(name[2:], [flag[2:] for flag in known if flag.startswith("--")], n=1,
                                              cutoff=0.8)
            if close:
                return f"unrecognized option {name} (did you mean --{close[0]}?)"
    return None


# what a command stopped by a signal leaves, and how to go on from it: a shard's tables and
# marker are written last and atomically, the evaluation's report at its end, and a training
# run's checkpoints after each epoch
_AFTER_STOP = {
    "segment": "what was committed is kept; run the same command again to go on",
    "evaluate": "its report is written at the end; run the same command again",
    "train": "the finished epochs' checkpoints are kept; --resume the last one (OUTPUT's name with .last before "
             "its extension) to go on",
}


@contextlib.contextmanager
def _sigterm_exits() -> typing.Iterator[None]:
    """Within it, SIGTERM raises SystemExit(15), as the handler Ray's driver installs once it
    starts does: a job stopped while it checks its settings or lists SOURCE, before Ray, says
    so in its one line too, where SIGTERM's default would end it without a word. Only where
    the default is in place (an embedding program's own handler stays), and put back after,
    unless Ray or Prefect replaced it meanwhile."""
    def exit_(signum: int, _frame: types.FrameType | None) -> None:
        sys.exit(signum)

    installed = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if installed:
        signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        if installed and signal.getsignal(signal.SIGTERM) is exit_:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupting_signal(err: BaseException) -> signal.Signals | None:
    """The signal that stopped a command, if `err` is how it surfaced: KeyboardInterrupt for
    SIGINT, and for SIGTERM the SystemExit(15) that our handler (`_sigterm_exits`), then the
    one `ray.init` installs, raise (Prefect's, within a flow, hands the signal on to the one
    before it), or Prefect's TerminationSignal, which its flow engine raises in their place.
    Any may come wrapped: raised inside a Ray call, CPython reports it as a SystemError
    caused by it, and the flow engine may re-raise another in its place."""
    for link in error_chain(err):
        if isinstance(link, KeyboardInterrupt):
            return signal.SIGINT
        if isinstance(link, SystemExit) and link.code == signal.SIGTERM:
            return signal.SIGTERM
        if getattr(link, "signal", None) == signal.SIGTERM:  # TerminationSignal, not imported: Prefect may not be
            return signal.SIGTERM
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if (misspelled := _misspelled_option(parser, argv)) is not None:
        print(f"segpipe: error: {misspelled}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _plain_output_when_piped()
    try:
        with _sigterm_exits() if hasattr(args, "after_stop") else contextlib.nullcontext():
            return args.run(args)
    except ValidationError as err:
        for line in _validation_lines(err, getattr(args, "job_config", JobConfig)):
            print(f"segpipe: error: {line}", file=sys.stderr)
        return 2
    except (UsageError, RunError, ValueError) as err:
        print(f"segpipe: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"segpipe: error: {err}", file=sys.stderr)
        return 1
    except StorageUnavailableError as err:  # an outage, not a setting: what is committed is kept
        print(f"segpipe: error: storage unavailable: {err}; run the same command again once it answers", file=sys.stderr)
        return 2  # as the run's own outages (RunError): a scheduler tells a night that could not run by its 2
    except BaseException as err:
        if (stopped := _interrupting_signal(err)) is None:
            raise
        after = getattr(args, "after_stop", "run the same command again")
        print(f"segpipe: stopped by {stopped.name}: {after}", file=sys.stderr)
        return 128 + stopped


def run() -> typing.NoReturn:
    """The `segpipe` command: `main()`, then the exit a Python program makes, without the
    interpreter's teardown. After a run, that teardown garbage-collects the modules of Prefect
    and Ray one by one: 2 s on this 2-core machine, after the summary was printed, for memory
    the process returns anyway. What an exit does before it still happens, in its order (as
    `Py_FinalizeEx`): threading's exit hooks (Prefect's log and event senders send their last)
    and the other threads waited for, then the atexit handlers (Ray shuts down, Prefect's
    temporary server stops), then output flushed; a flush that fails exits 120, as Python does."""
    code = main()
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe
        code = 120
    os._exit(code)


if __name__ == "__main__":
    run()
