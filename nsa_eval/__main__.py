"""`python -m nsa_eval ...` is `nsa-eval ...`; torchrun needs it: `torchrun --nproc-per-node N -m nsa_eval run ...`."""

from nsa_eval.cli import main

main(prog_name="nsa-eval")
