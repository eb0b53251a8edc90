"""The `edgegen` command. Each command parses options and calls one library function;
torch is imported only inside the commands that need it."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click

from edgegen.config import RNN_CELLS, parse_override
from edgegen.errors import EdgegenError, PeerStopped, first_line


class OneLineError(click.ClickException):
    """A usage error as one line on stderr, like every other error (exit code 2)."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class EdgegenGroup(click.Group):
    """Every error becomes one line on stderr and a non-zero exit; --debug adds the
    traceback. edgegen's own errors and OS errors exit 1, usage errors 2, Ctrl-C 130."""

    def make_context(self, info_name, args, *rest, **kwargs) -> click.Context:
        argv = list(args)
        try:
            ctx = super().make_context(info_name, args, *rest, **kwargs)
        except click.UsageError as e:
            raise _one_line(e) from None
        ctx.meta["edgegen.argv"] = argv  # what `train --nproc` starts each process with
        return ctx

    def main(self, *args, **kwargs):
        """A rank of a distributed run (`train` under torchrun or --nproc) ends here,
        once its error (if any) has been said, without the interpreter's teardown
        (launch.end_rank); any other command ends as click ends it."""
        from edgegen.launch import end_rank, is_rank

        try:
            return super().main(*args, **kwargs)
        except SystemExit as e:
            if is_rank():
                end_rank(e.code)
            raise

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:  # the reader (say `head`) has all it wants: no message
            _silence_stdout()
            ctx.exit(141)  # what a shell reports for a program that SIGPIPE ended
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except PeerStopped:  # one rank of a distributed run: rank 0 says why
            ctx.exit(1)
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):  # set by the group's callback
                traceback.print_exc()
            click.echo(f"error: {' '.join(_describe(e).splitlines())}", err=True)
            ctx.exit(1)


def _silence_stdout() -> None:
    """Point stdout at devnull, so the flush at exit cannot fail on the closed pipe
    again (as the Python docs on SIGPIPE suggest)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a test runner)
        pass


def _one_line(e: click.UsageError) -> OneLineError:
    command = e.ctx.command_path if e.ctx else "edgegen"
    message = " ".join(e.format_message().split())
    return OneLineError(f"{message} (see: {command} --help)")


def _describe(e: Exception) -> str:
    if isinstance(e, EdgegenError):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)
    if isinstance(e, ImportError):
        return f"{e.msg}; install the export extra: pip install 'edgegen[export]'"
    return f"unexpected {type(e).__name__}: {first_line(e)} (run with --debug for a traceback)"


@click.group(cls=EdgegenGroup)
@click.version_option(package_name="edgegen")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Train small language models, export them, and run them on devices."""
    ctx.obj = {"debug": debug}


@main.command("train")
@click.option("--family", type=click.Choice(["gpt", "rnn"]), default="gpt", show_default=True)
@click.option(
    "--cell",
    type=click.Choice(RNN_CELLS),
    default="gru",
    show_default=True,
    help="RNN cell (with --family rnn).",
)
@click.option("--preset", default="tiny", show_default=True, help="Size preset: tiny, small, base.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Override a model config field, e.g. --set dim=96 (repeatable).",
)
@click.option(
    "--data",
    type=click.Path(),
    default=None,
    help="Text file or folder of text files [default: the embedded corpus].",
)
@click.option(
    "--init",
    type=click.Path(),
    default=None,
    help="Fine-tune this checkpoint: keep its architecture and tokenizer.",
)
@click.option("--steps", type=int, default=1000, show_default=True, help="Total optimizer steps.")
@click.option(
    "--batch-size",
    type=int,
    default=32,
    show_default=True,
    help="Rows per micro-batch, shared by all processes.",
)
@click.option(
    "--grad-accum",
    type=int,
    default=1,
    show_default=True,
    help="Micro-batches per optimizer step (as one batch that many times larger).",
)
@click.option(
    "--seq-len",
    type=int,
    default=None,
    help="GPT training window [default: max_seq_len; with --init at most 256].",
)
@click.option("--bptt", type=int, default=64, show_default=True, help="RNN truncated-BPTT length.")
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Peak learning rate [default: 3e-3 tiny, 2e-3 small, 6e-4 base; 1e-4 with --init].",
)
@click.option("--eval-interval", type=int, default=100, show_default=True)
@click.option(
    "--eval-tokens", type=int, default=16384, show_default=True, help="Tokens per validation."
)
@click.option(
    "--save-interval",
    type=int,
    default=None,
    help="Checkpoint every N steps [default: --eval-interval].",
)
@click.option(
    "--out",
    type=click.Path(),
    default="runs/model",
    show_default=True,
    help="Checkpoint directory.",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--nproc",
    type=int,
    default=1,
    show_default=True,
    help="Train in N processes (DDP: gloo on CPU, one GPU each with nccl), as torchrun does.",
)
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out up to --steps.")
@click.option("--force", is_flag=True, help="Replace an existing checkpoint in --out.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.pass_context
def train_command(ctx, overrides, resume, force, quiet, nproc, **kwargs) -> None:
    """Train a model (or resume one, or fine-tune one with --init) and write its checkpoint.
    Under torchrun, each process is one rank of the run."""
    from edgegen.launch import as_rank, check_world, launch, launched_size

    size = launched_size()
    if size is not None and nproc not in (1, size):
        raise click.UsageError(f"--nproc {nproc} differs from the {size} processes started")
    check_world(nproc, kwargs["batch_size"])
    if nproc > 1 and size is None:
        ctx.exit(launch(ctx.meta["edgegen.argv"], nproc))
    if size is not None:
        as_rank()

    from edgegen.train import TrainOptions, train

    options = TrainOptions(overrides=dict(parse_override(o) for o in overrides), **kwargs)
    result = train(options, resume=resume, force=force, progress=not quiet)
    if result.rank != 0:
        return
    val = f"{result.val_bpb:.3f} bits/byte" if result.val_bpb is not None else "n/a"
    state = "stopped early, resumable with --resume" if result.interrupted else "done"
    click.echo(
        f"{result.out}: step {result.step}, {result.parameters:,} parameters, "
        f"validation {val} ({state})"
    )


@main.command("import")
@click.argument("source", type=click.Path(), required=False)
@click.option("--out", required=True, type=click.Path(), help="Checkpoint directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing checkpoint in --out.")
@click.option(
    "--module",
    "module_spec",
    default=None,
    help="Your own nn.Module instead of SOURCE: FILE.py:ClassName (an RNN or "
    "nn.TransformerEncoder language model).",
)
@click.option(
    "--state-dict",
    type=click.Path(),
    default=None,
    help="Its weights: a torch.save(model.state_dict()) file or .safetensors.",
)
@click.option("--init-args", default=None, help="ClassName's arguments: a JSON list or object.")
@click.option(
    "--tokenizer",
    type=click.Path(),
    default=None,
    help="Its vocabulary: a tokenizer.json, or one word per line (line number = id).",
)
def import_command(source, out, force, module_spec, state_dict, init_args, tokenizer) -> None:
    """Import a pretrained model (a Hugging Face directory or a GGUF file), or your own
    nn.Module (--module, --state-dict, --tokenizer), as a checkpoint."""
    module_options = {
        "--state-dict": state_dict,
        "--init-args": init_args,
        "--tokenizer": tokenizer,
    }
    if module_spec is None:
        given = [name for name, value in module_options.items() if value is not None]
        if source is None or given:
            raise click.UsageError(
                f"{given[0]} goes with --module" if given else "give SOURCE or --module"
            )
        from edgegen.importers.pretrained import import_pretrained

        click.echo(import_pretrained(source, out, force=force).summary())
        return
    if source is not None or state_dict is None or tokenizer is None:
        raise click.UsageError("--module takes --state-dict and --tokenizer, and no SOURCE")
    from edgegen.importers.module import import_module_file

    result = import_module_file(module_spec, state_dict, tokenizer, out, init_args, force)
    click.echo(result.summary())


def sampling_options(command):
    """The sampling flags shared by `generate` and `sample` (Hugging Face names)."""
    options = [
        click.option("--max-new-tokens", type=int, default=None, help="[default: the bundle's]"),
        click.option("--min-new-tokens", type=int, default=None),
        click.option("--temperature", type=float, default=None, help="0 = greedy."),
        click.option("--top-k", type=int, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--min-p", type=float, default=None),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--presence-penalty", type=float, default=None),
        click.option("--frequency-penalty", type=float, default=None),
        click.option("--stop", multiple=True, help="Stop before this text (repeatable)."),
        click.option("--ignore-eos", is_flag=True, default=None, help="Do not stop at EOS."),
        click.option("--seed", type=int, default=None, help="Reproduce a sampled run."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def chat_options(command):
    """The chat flags shared by `generate` and `sample`."""
    command = click.option(
        "--system", default=None, help="System message for --chat [default: the template's own]."
    )(command)
    return click.option(
        "--chat",
        is_flag=True,
        help="Answer each prompt as the model's assistant, through its chat template; "
        "without --prompt, a conversation: one user turn per line of stdin.",
    )(command)


@main.command("generate")
@click.argument("bundle", type=click.Path())
@click.option("--prompt", "prompts", multiple=True, help="Text to continue (repeatable: a batch).")
@click.option("--prompt-file", type=click.Path(), default=None, help="Read the prompt from a file.")
@click.option(
    "--backend", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True
)
@click.option("--precision", default="fp32", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="Intra-op threads.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@chat_options
@sampling_options
def generate_command(
    bundle,
    prompts,
    prompt_file,
    backend,
    precision,
    device,
    threads,
    stream,
    as_json,
    chat,
    system,
    stop,
    **sampling,
) -> None:
    """Generate text from a bundle with the torch-free runtime (stdin when no prompt)."""
    import edgegen.runtime

    check_output_flags(stream, as_json, len(prompts))
    check_chat_flags(chat, system, as_json, given=bool(prompts or prompt_file))
    prompts = list(argv_text(prompts, "--prompt"))
    if not prompts and (prompt_file or not chat):  # --chat alone reads its turns later
        prompts = [read_prompt(prompt_file)]
    generator = edgegen.runtime.load(bundle, backend, precision, device, threads)
    respond(generator, prompts, stream, as_json, chat, system, stop, sampling)


@main.command("sample")
@click.argument("checkpoint", type=click.Path())
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    help="Text to continue (repeatable) [default: 'The '; with --chat: a conversation].",
)
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@chat_options
@sampling_options
def sample_command(checkpoint, prompts, stream, as_json, chat, system, stop, **sampling) -> None:
    """Continue prompts with a checkpoint in eager PyTorch (same loop and sampler)."""
    from edgegen.eager import load_eager

    check_output_flags(stream, as_json, len(prompts))
    check_chat_flags(chat, system, as_json, given=bool(prompts))
    prompts = list(argv_text(prompts, "--prompt")) or ([] if chat else ["The "])
    model = load_eager(checkpoint)
    respond(model, prompts, stream, as_json, chat, system, stop, sampling)


def check_output_flags(stream: bool, as_json: bool, n_prompts: int) -> None:
    """--stream prints one text as it grows; JSON and batches are printed whole."""
    if stream and as_json:
        raise click.UsageError("--stream and --json cannot be combined")
    if stream and n_prompts > 1:
        raise click.UsageError("--stream takes a single prompt")


def check_chat_flags(chat: bool, system: str | None, as_json: bool, given: bool) -> None:
    """--system belongs to --chat; a conversation prints its answers as they come."""
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat")
    if chat and as_json and not given:
        raise click.UsageError("--json with --chat needs --prompt (a conversation is not JSON)")


def argv_text(values, option: str) -> tuple[str, ...]:
    """Command-line text as UTF-8. Python hands over argv bytes that are not UTF-8 as
    surrogate escapes (PEP 383): turn them back into bytes and refuse them, as a
    prompt file is refused, rather than pass lone surrogates on."""
    from edgegen.errors import GenerationError

    texts = []
    for value in values:
        try:
            raw = os.fsencode(value)
        except UnicodeEncodeError:  # not from argv: the runtime refuses the surrogate
            texts.append(value)
            continue
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise GenerationError(f"{option} is not UTF-8 (bad byte at offset {e.start})") from None
    return tuple(texts)


def read_prompt(path: str | None) -> str:
    from edgegen.errors import GenerationError

    if path is None:
        if sys.stdin.isatty():
            raise GenerationError("no prompt: pass --prompt, --prompt-file, or text on stdin")
        data, source = sys.stdin.buffer.read(), "stdin"
    else:
        try:
            with open(path, "rb") as f:
                data, source = f.read(), path
        except OSError as e:
            raise GenerationError(f"cannot read prompt file {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GenerationError(
            f"prompt from {source} is not UTF-8 (bad byte at offset {e.start})"
        ) from None


def respond(generator, prompts, stream, as_json, chat, system, stop, sampling) -> None:
    """What `generate` and `sample` do once their model is loaded."""
    sampling = dict(sampling, stop=argv_text(stop, "--stop"))
    if not chat:
        run_generation(generator, prompts, stream, as_json, **sampling)
        return
    system = None if system is None else argv_text([system], "--system")[0]
    run_chat(generator, prompts, system, stream, as_json, **sampling)


def run_generation(generator, prompts, stream, as_json, **sampling) -> None:
    sampling = _given(sampling)
    if stream:  # one prompt, no JSON: check_output_flags
        click.echo(prompts[0], nl=False)
        echo_stream(generator.stream(prompts[0], **sampling))
        return
    results = generator.generate_batch(prompts, **sampling)
    records = [{"prompt": p} for p in prompts]
    texts = [p + r.text for p, r in zip(prompts, results, strict=True)]
    echo_results(prompts, results, as_json, records, texts)


def run_chat(generator, prompts, system, stream, as_json, **sampling) -> None:
    """A one-turn chat per prompt, or, without prompts, a conversation on stdin."""
    sampling = _given(sampling)
    _ = generator.chat_template  # a model without one says so before stdin is read
    if not prompts:
        converse(generator, system, stream, sampling)
        return
    chats = [[*_system_turn(system), {"role": "user", "content": p}] for p in prompts]
    if stream:  # one prompt, no JSON: check_output_flags
        echo_stream(generator.stream_chat(chats[0], **sampling))
        return
    results = generator.chat_batch(chats, **sampling)
    records = [{"messages": chat} for chat in chats]
    echo_results(prompts, results, as_json, records, [r.text for r in results])


def converse(generator, system, stream, sampling) -> None:
    """A conversation: each line of stdin is a user turn, answered with the whole history
    as the prompt, until an empty line or the end of input (Ctrl-D). A history that no
    longer fits the context ends it with one line (exit 1) rather than dropping turns
    the user still sees on screen."""
    from edgegen.errors import ContextError

    tty = sys.stdin.isatty()
    if tty:
        click.echo("(an empty line or Ctrl-D ends the conversation)", err=True)
    history = _system_turn(system)
    while line := read_turn(tty):
        history.append({"role": "user", "content": line})
        try:
            answer = answer_turn(generator, history, stream, sampling)
        except ContextError as e:
            raise ContextError(f"the conversation outgrew the model's context: {e}") from None
        history.append({"role": "assistant", "content": answer})


def read_turn(tty: bool) -> str:
    """The next line of stdin without its line ending; "" at a blank line or the end."""
    from edgegen.errors import GenerationError

    if tty:
        click.echo("> ", nl=False, err=True)
    line = sys.stdin.buffer.readline()
    if tty and not line:  # Ctrl-D: leave the terminal on a fresh line
        click.echo(err=True)
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise GenerationError(
            f"a line of stdin is not UTF-8 (bad byte at offset {e.start})"
        ) from None
    return text if text.strip() else ""


def answer_turn(generator, messages, stream, sampling) -> str:
    if stream:
        return echo_stream(generator.stream_chat(messages, **sampling))
    text = generator.chat(messages, **sampling).text
    click.echo(text)
    return text


def _system_turn(system: str | None) -> list[dict[str, str]]:
    return [] if system is None else [{"role": "system", "content": system}]


def _given(sampling: dict) -> dict:
    return {k: v for k, v in sampling.items() if v is not None and v != ()}


def echo_stream(pieces) -> str:
    """Prints text pieces as they come, then a newline; returns the whole text."""
    text = []
    for piece in pieces:
        click.echo(piece, nl=False)
        text.append(piece)
    click.echo()
    return "".join(text)


def echo_results(prompts, results, as_json, records, texts) -> None:
    """JSON (each request's record with its result), or the texts, under a header each
    when there are several."""
    import json

    if as_json:
        rows = [{**rec, **r.to_dict()} for rec, r in zip(records, results, strict=True)]
        click.echo(json.dumps(rows, indent=2))
        return
    for prompt, result, text in zip(prompts, results, texts, strict=True):
        if len(prompts) > 1:
            click.echo(f"--- {prompt!r} ({result.finish_reason})")
        click.echo(text)


def quantize_options(command):
    """Flags shared by `export --quantize` and `quantize`."""
    options = [
        click.option(
            "--block-size",
            type=int,
            default=None,
            help="MatMulNBits block size (weights per scale) for int8 and int4 "
            "[default: a transformer's int4 128, then 64, then 32 as each fails its gate "
            "(weights already on a 4-bit grid keep its blocks), its int8 64, then 32; "
            "an RNN's 32].",
        ),
        click.option(
            "--accuracy-level",
            type=int,
            default=4,
            show_default=True,
            help="MatMulNBits compute type (4 = int8 activations).",
        ),
        click.option(
            "--gate",
            "gates",
            multiple=True,
            metavar="PRECISION.FIELD=VALUE",
            help="Lower (or raise) a quality gate, e.g. --gate int8.top1=0.9 "
            "(fields: kl, top1, ppl_change).",
        ),
        click.option(
            "--eval-text",
            type=click.Path(),
            default=None,
            help="Held-out text for the quality gates [default: the embedded corpus's "
            "validation split; a word-level model needs text in its vocabulary].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_quantize_options(precisions, block_size, accuracy_level, gates, eval_text):
    from edgegen.errors import ExportError
    from edgegen.export import QuantizeOptions

    parsed: dict[str, dict[str, float]] = {}
    for text in gates:
        key, sep, value = text.partition("=")
        precision, dot, field = key.partition(".")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not dot or number is None:
            raise ExportError(f"--gate must look like int8.top1=0.9, got {text!r}")
        parsed.setdefault(precision, {})[field] = number
    return QuantizeOptions(_csv(precisions), block_size, accuracy_level, parsed, eval_text)


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option(
    "--format",
    "formats",
    default="onnx,torchscript",
    show_default=True,
    help="Comma-separated formats: onnx, torchscript.",
)
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (>= 18).")
@click.option(
    "--max-seq-len",
    type=int,
    default=None,
    help="Context the runtime allows [default: the model's].",
)
@click.option(
    "--quantize",
    "precisions",
    default="",
    help="Also write quantized artifacts: int8, int4, fp16 (comma-separated).",
)
@quantize_options
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
def export_command(
    checkpoint,
    out,
    formats,
    opset,
    max_seq_len,
    precisions,
    block_size,
    accuracy_level,
    gates,
    eval_text,
    force,
) -> None:
    """Export a checkpoint to a bundle, gated by parity with eager PyTorch."""
    from edgegen.export import export_bundle
    from edgegen.export.summary import bundle_summary

    quantize = build_quantize_options(precisions, block_size, accuracy_level, gates, eval_text)
    manifest = export_bundle(
        checkpoint,
        out,
        formats=_csv(formats),
        opset=opset,
        max_seq_len=max_seq_len,
        force=force,
        on_artifact=lambda what: click.echo(f"exporting {what}...", err=True),
        quantize=quantize,
    )
    click.echo(bundle_summary(manifest))


@main.command("quantize")
@click.argument("bundle", type=click.Path())
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(),
    help="The checkpoint exported: quality is measured against it in eager PyTorch "
    "[default: the weights of the bundle's fp32 TorchScript artifact].",
)
@click.option(
    "--precision", "precisions", required=True, help="int8, int4, fp16 (comma-separated)."
)
@quantize_options
def quantize_command(
    bundle, checkpoint, precisions, block_size, accuracy_level, gates, eval_text
) -> None:
    """Add quantized artifacts to a bundle, each gated on quality."""
    from edgegen.export import quantize_bundle
    from edgegen.export.summary import bundle_summary

    options = build_quantize_options(precisions, block_size, accuracy_level, gates, eval_text)
    manifest = quantize_bundle(
        bundle,
        checkpoint,
        options,
        on_artifact=lambda w: click.echo(f"quantizing {w}...", err=True),
    )
    click.echo(bundle_summary(manifest))


@main.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--checkpoint", required=True, type=click.Path(), help="The checkpoint exported.")
@click.option(
    "--levels",
    default="1,2,3,4,5,6",
    show_default=True,
    help="Comma-separated levels: 1 step, 2 cache, 3 greedy, 4 quality, 5 sampling, 6 files.",
)
@click.option(
    "--tokens", type=int, default=128, show_default=True, help="Greedy tokens per prompt."
)
@click.option(
    "--eval-text",
    type=click.Path(),
    default=None,
    help="Held-out text for level 4 [default: the embedded corpus's validation split; "
    "skipped when the model's vocabulary does not cover it].",
)
@click.option(
    "--gate",
    "gates",
    multiple=True,
    metavar="PRECISION.FIELD=VALUE",
    help="Change a level-4 quality gate, e.g. --gate int8.top1=0.9.",
)
@click.option(
    "--json", "json_out", type=click.Path(), default=None, help="Write the report as JSON."
)
@click.option(
    "--strict",
    is_flag=True,
    help="Also exit non-zero when a check was skipped (fp16 without a CUDA GPU, level 4 "
    "without held-out text in the model's vocabulary).",
)
def verify_command(bundle, checkpoint, levels, tokens, eval_text, gates, json_out, strict) -> None:
    """Check every artifact of a bundle against eager PyTorch, level by level."""
    from edgegen.errors import VerifyError
    from edgegen.verify import verify_bundle, write_report

    try:
        chosen = tuple(int(v) for v in levels.split(",") if v.strip())
    except ValueError:
        raise VerifyError(
            f"levels must be numbers 1-6 separated by commas, got {levels!r}"
        ) from None
    quality_gates = build_quantize_options("", 32, 4, gates, eval_text).gates
    report = verify_bundle(
        bundle,
        checkpoint,
        levels=chosen,
        tokens=tokens,
        eval_text=eval_text,
        quality_gates=quality_gates,
    )
    click.echo(report.table())
    if json_out:
        write_report(report, json_out)
    counts, total = report.counts(), len(report.checks)
    if counts["failed"]:
        raise VerifyError(f"{counts['failed']} of {total} checks failed")
    if strict and counts["skipped"]:
        raise VerifyError(f"{counts['skipped']} of {total} checks skipped (--strict)")


@main.command("bench")
@click.argument("bundle", type=click.Path())
@click.option(
    "--checkpoint",
    type=click.Path(),
    default=None,
    help="The checkpoint, for the eager PyTorch baseline row.",
)
@click.option("--backends", default="eager,torchscript,onnx", show_default=True)
@click.option("--precisions", default="fp32", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--prompt-len", type=int, default=32, show_default=True)
@click.option("--new-tokens", type=int, default=64, show_default=True)
@click.option(
    "--long-tokens",
    type=int,
    default=1000,
    show_default=True,
    help="Length of the per-position run (capped by the context).",
)
@click.option(
    "--long-repeat",
    type=int,
    default=3,
    show_default=True,
    help="Long runs; per-position latency is their median.",
)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--repeat", type=int, default=5, show_default=True)
@click.option(
    "--cold-repeat",
    type=int,
    default=5,
    show_default=True,
    help="Fresh `edgegen generate` processes timed for the cold start (0: none).",
)
@click.option(
    "--sample",
    is_flag=True,
    help="Seeded top-k + top-p sampling instead of greedy (measures the sampler's overhead).",
)
@click.option("--json", "json_out", type=click.Path(), default=None)
@click.option("--markdown", "markdown_out", type=click.Path(), default=None)
@click.option(
    "--plot", "plot_out", type=click.Path(), default=None, help="PNG of latency per position."
)
@click.option("--quiet", is_flag=True, help="No progress output.")
def bench_command(backends, precisions, json_out, markdown_out, plot_out, quiet, **kwargs) -> None:
    """Benchmark a bundle's backends and precisions (each row in its own process)."""
    from edgegen.bench import BenchOptions, run_bench
    from edgegen.bench import report as bench_report

    options = BenchOptions(backends=_csv(backends), precisions=_csv(precisions), **kwargs)
    report = run_bench(options, progress=not quiet)
    click.echo(bench_report.table(report))
    if "eager" in options.backends and options.checkpoint is None:
        click.echo("note: no --checkpoint, so no eager baseline row and no ratios", err=True)
    if json_out:
        bench_report.write_json(report, json_out)
    if markdown_out:
        Path(markdown_out).write_text(bench_report.markdown(report))
    if plot_out and not bench_report.plot(report, plot_out):
        click.echo("note: --plot needs matplotlib: pip install 'edgegen[plot]'", err=True)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


if __name__ == "__main__":
    sys.exit(main())
