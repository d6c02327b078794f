"""``python -m cdsr``: the ``cdsr`` command (what ``torchrun -m cdsr train ...`` starts per process)."""

from cdsr.cli import main

if __name__ == "__main__":
    main()
