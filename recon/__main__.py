"""``python -m recon`` = the ``recon`` command (``recon.cli``)."""

from recon.cli import main

main()
