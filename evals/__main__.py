"""`python -m evals`: run the evaluation suites (see `python -m evals --help`)."""

from .runner import main

raise SystemExit(main())
