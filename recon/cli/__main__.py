"""``python -m recon.cli`` = the ``recon`` command (as ``python -m recon``)."""

from recon.cli import main

if __name__ == "__main__":
    main()
