"""Sub-commands of the ``gramnewton`` CLI (the only package code that prints)."""
