"""``python -m recon`` = the ``recon`` command (``recon.cli``)."""

from recon.cli import main

if __name__ == "__main__":  # not again in the processes a local Dask cluster spawns
    main()
