"""``python -m audit``: see :mod:`audit.cli`."""

from audit.cli import entry

if __name__ == "__main__":
    entry()
