"""``python -m bpd_sr ...`` is the ``bpd-sr`` command; torchrun starts training this way:
``torchrun --nproc-per-node N -m bpd_sr train ...``."""

from bpd_sr.cli import main

main(prog_name="bpd-sr")
