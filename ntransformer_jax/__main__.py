from ntransformer_jax.cli import run

run()
