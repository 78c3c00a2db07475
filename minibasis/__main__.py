"""``python -m minibasis VERB ...`` runs the command line (the same as the ``minibasis`` script)."""
import sys

from minibasis.cli import main

sys.exit(main())
